"""``gradwatch demo``: a small real training on CPU, with an unstable phase, watched live.

The model learns a noisy teacher network (data generated here, nothing downloaded).
Between 45 % and 52 % of the steps the learning rate jumps 80x: loss and gradient norm
spike, then training recovers. The probe records every step; the agent (started for you
if none runs) exports it at /metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gradwatch.spool.format import SpoolLayout, default_home
from gradwatch.status import agent_url, get_json, make_console, runs_table

BASE_LR = 0.01
SPIKE_FACTOR = 80.0
SPIKE_PHASE = (0.45, 0.52)
RUN_NAME = "demo"


@dataclass
class _Snapshot:
    step: int = 0
    loss: float = float("nan")
    grad_norm_seen_by_agent: float | None = None
    lr: float = BASE_LR
    phase: str = "warm-up"
    agent: dict[str, Any] | None = None


def _learning_rate(step: int, steps: int) -> tuple[float, str]:
    fraction = step / steps
    if fraction < SPIKE_PHASE[0]:
        return BASE_LR, "training"
    if fraction < SPIKE_PHASE[1]:
        return BASE_LR * SPIKE_FACTOR, f"[bold red]unstable: learning rate x{SPIKE_FACTOR:g}[/]"
    return BASE_LR, "recovering"


def _build_problem() -> tuple[Any, Any, Any]:
    import torch

    torch.manual_seed(0)
    inputs, hidden = 16, 128
    teacher = torch.nn.Sequential(torch.nn.Linear(inputs, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        x = torch.randn(16384, inputs)
        y = teacher(x) + 0.1 * torch.randn(16384, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                         drop_last=True)
    model = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=0.9)
    return model, optimizer, loader


def _wait_for_agent(layout: SpoolLayout, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = agent_url(layout)
        if url:
            try:
                if get_json(url + "/healthz", timeout=1.0).get("ok"):
                    return url
            except (OSError, ValueError):
                pass
        time.sleep(0.2)
    return None


def _agent_view(url: str | None, run: str) -> dict[str, Any] | None:
    if url is None:
        return None
    try:
        runs = get_json(url + "/api/runs", timeout=1.0)["runs"]
    except (OSError, ValueError, KeyError):
        return None
    return next((r for r in runs if r["run"] == run), None)


def _panel(snap: _Snapshot, progress: Progress, url: str | None) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    table.add_row("phase", snap.phase)
    table.add_row("learning rate", f"{snap.lr:.3g}")
    table.add_row("loss", f"{snap.loss:.4f}")
    agent = snap.agent
    if agent and agent["ranks"]:
        rank = agent["ranks"][0]
        spikes = rank["spikes"]
        table.add_row("agent sees", f"{agent['status']}, {rank['steps']} steps, grad norm {rank['grad_norm'] or 0:.3g}, "
                                    f"{rank['samples_per_second'] or 0:.0f} samples/s")
        table.add_row("spikes detected", f"loss {spikes['loss']}, grad norm {spikes['grad_norm']}")
    else:
        table.add_row("agent sees", "[dim]waiting for the agent...[/]" if url else "[yellow]no agent[/]")
    return Panel(Group(progress, table), title="gradwatch demo", subtitle=f"{url}/metrics" if url else None)


def run_demo(home: Path | None, steps: int, steps_per_second: float, live: bool = True) -> None:
    import torch

    import gradwatch

    console = make_console()
    layout = SpoolLayout(home or default_home())
    console.print(f"[bold]gradwatch demo[/]: {steps} steps of a small MLP on CPU, with an unstable phase "
                  f"at {SPIKE_PHASE[0]:.0%}-{SPIKE_PHASE[1]:.0%} of training.")
    model, optimizer, loader = _build_problem()
    probe = gradwatch.attach(model, optimizer, run=RUN_NAME, home=layout.home, labels={"example": "demo"})
    probe.wait_ready()
    url = _wait_for_agent(layout, timeout=20.0)
    if url:
        console.print(f"Run [bold]{probe.run}[/] is exported at [link]{url}/metrics[/link]  (runs as JSON: {url}/api/runs)")
    else:
        console.print(f"[yellow]No agent answered[/] (see {layout.agent_log_file}); the run is still recorded in "
                      f"{layout.runs_dir} and `gradwatch status` reads it.")

    snap = _Snapshot()
    progress = Progress(TextColumn("step"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    task = progress.add_task("train", total=steps)
    batches = iter(loader)
    started = time.monotonic()
    next_agent_poll = 0.0
    with Live(_panel(snap, progress, url), console=console, refresh_per_second=4, transient=False) if live \
            else _NoLive() as display:
        for step in range(steps):
            try:
                xb, yb = next(batches)
            except StopIteration:
                batches = iter(loader)
                xb, yb = next(batches)
            snap.lr, snap.phase = _learning_rate(step, steps)
            for group in optimizer.param_groups:
                group["lr"] = snap.lr
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            probe.log(loss=loss, batch_size=len(xb))
            snap.step = step + 1
            progress.update(task, completed=snap.step)
            if live and time.monotonic() >= next_agent_poll:
                snap.loss = float(loss.detach())  # the demo's own display; the probe never reads values here
                snap.agent = _agent_view(url, probe.run)
                next_agent_poll = time.monotonic() + 0.5
                display.update(_panel(snap, progress, url))
            elif not live and snap.step % max(1, steps // 10) == 0:
                console.print(f"step {snap.step:5d}/{steps}  loss {float(loss.detach()):8.4f}  lr {snap.lr:.3g}  "
                              f"{_strip_markup(snap.phase)}")
            if steps_per_second > 0:
                time.sleep(max(0.0, started + snap.step / steps_per_second - time.monotonic()))
    probe.close()
    _finish(console, url, probe.run, steps, layout)


def _finish(console: Console, url: str | None, run: str, steps: int, layout: SpoolLayout) -> None:
    view = None
    deadline = time.monotonic() + 10
    while url and time.monotonic() < deadline:  # let the agent ingest the last records
        view = _agent_view(url, run)
        if view and view["status"] == "finished" and view["ranks"][0]["steps"] == steps:
            break
        time.sleep(0.2)
    if view:
        console.print(runs_table([view], "what the agent exported"))
        spikes = view["ranks"][0]["spikes"]
        console.print(f"Spikes detected at step resolution: loss {spikes['loss']}, grad norm {spikes['grad_norm']} "
                      f"(gradwatch_spikes_total).")
    console.print("\nNext:")
    if url:
        console.print(f"  curl -s {url}/metrics | grep gradwatch_loss")
    console.print("  gradwatch status")
    console.print(f"  the spool of this run: {layout.run_dir(run)}")


def _strip_markup(text: str) -> str:
    from rich.text import Text

    return Text.from_markup(text).plain


class _NoLive:
    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *args: object) -> None:
        return None
