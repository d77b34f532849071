"""``gradwatch demo``: a small real training on CPU that diverges and is rescued by gradwatch's rules.

The model learns a noisy teacher network (data generated here, nothing downloaded). At 45 %
of the steps the learning rate jumps 80x (a bad restart of a schedule, say). The loss
spikes; the agent (started for you if none runs) detects it and sends the probe a rewind
to a snapshot from before the spike plus a learning-rate cut; the probe applies both at the
same step and training recovers. ZClip clips gradients all along and a NaN batch is skipped.
When the validation loss stops improving, early stopping ends the run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gradwatch.agent.settings import DEFAULT_PORT
from gradwatch.errors import GradwatchError
from gradwatch.spool.format import SpoolLayout, default_home
from gradwatch.status import actions_text, agent_url, get_json, make_console, runs_table
from gradwatch.terminal import safe

BASE_LR = 0.01
SPIKE_FACTOR = 80.0
SPIKE_AT = 0.45
NAN_AT = 0.25
VAL_EVERY = 25
RUN_NAME = "demo"

def demo_rules(steps: int) -> dict[str, Any]:
    """The demo's rules (docs/rules.md): they act, unlike the shipped defaults, which only observe.
    Early stopping starts watching once the run has had time to recover from the jump."""
    return {
        "guards": {
            "skip": {"on_nonfinite": "act"},
            "clip": {"scheme": "zclip", "max_norm": None},
            "snapshots": {"every": 50, "keep": 3},
        },
        "rules": [
            {"name": "rewind-on-spike", "metric": "loss", "detect": {"type": "spike", "z_threshold": 8},
             "action": {"type": "rewind", "skip_steps": 20, "min_back_steps": 25}, "mode": "act", "max_actions": 1},
            {"name": "cut-lr-on-spike", "metric": "loss", "detect": {"type": "spike", "z_threshold": 8},
             "action": {"type": "reduce_lr", "factor": 0.5}, "mode": "act", "max_actions": 2, "cooldown_steps": 100},
            {"name": "early-stop", "metric": "val_loss",
             "detect": {"type": "early_stopping", "patience": 4, "min_delta": 0.0005},
             "action": {"type": "stop"}, "mode": "act", "start_step": int(0.6 * steps)},
        ],
    }


@dataclass
class _Snapshot:
    step: int = 0
    loss: float = float("nan")
    grad_norm_seen_by_agent: float | None = None
    lr: float = BASE_LR
    phase: str = "warm-up"
    agent: dict[str, Any] | None = None


def _build_problem() -> tuple[Any, Any, Any, Any]:
    import torch

    torch.manual_seed(0)
    inputs, hidden = 16, 128
    teacher = torch.nn.Sequential(torch.nn.Linear(inputs, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        x = torch.randn(16384, inputs)
        y = teacher(x) + 0.1 * torch.randn(16384, 1)
        x_val = torch.randn(1024, inputs)
        y_val = teacher(x_val) + 0.1 * torch.randn(1024, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                         drop_last=True)
    model = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=0.9)
    return model, optimizer, loader, (x_val, y_val)


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
        table.add_row("guards", actions_text({"clip_threshold": rank.get("clip_threshold"),
                                              "clipped_fraction": rank.get("clipped_fraction")}))
        for action in rank.get("recent_actions", [])[-4:]:
            table.add_row(_steps(action), f"[bold]{action['action']}[/] ({action['reason']}): {action['detail']}")
    else:
        table.add_row("agent sees", "[dim]waiting for the agent...[/]" if url else "[yellow]no agent[/]")
    return Panel(Group(progress, table), title="gradwatch demo", subtitle=f"{url}/metrics" if url else None)


def _configured_port() -> int:
    try:
        return int(os.environ.get("GRADWATCH_PORT") or DEFAULT_PORT)
    except ValueError:
        return DEFAULT_PORT


def _no_agent_message(layout: SpoolLayout) -> str:
    autostart = os.environ.get("GRADWATCH_AUTOSTART", "1").strip().lower() not in ("0", "false", "no", "off")
    try:
        tail = [line for line in layout.agent_log_file.read_text(errors="replace").splitlines() if line.strip()][-3:]
    except OSError:
        tail = []
    why = ("the agent it started did not answer within 20 s" + (f"; its log ({layout.agent_log_file}) ends with:\n  "
                                                               + "\n  ".join(tail) if tail else "")
           if autostart else "GRADWATCH_AUTOSTART is off and no agent serves this spool")
    return (f"the demo needs a running agent, or no rule can act and it would only pretend: {why}. Start one with "
            f"`gradwatch agent --home {layout.home}` (or unset GRADWATCH_AUTOSTART) and run the demo again.")


def run_demo(home: Path | None, steps: int, steps_per_second: float, live: bool = True) -> None:
    import torch

    import gradwatch

    console = make_console()
    layout = SpoolLayout(home or default_home())
    console.print(f"[bold]gradwatch demo[/]: up to {steps} steps of a small MLP on CPU. At {SPIKE_AT:.0%} the "
                  f"learning rate jumps {SPIKE_FACTOR:g}x; gradwatch's rules rewind, cut the learning rate, then stop "
                  f"early.")
    model, optimizer, loader, (x_val, y_val) = _build_problem()
    probe = gradwatch.attach(model, optimizer, run=RUN_NAME, home=layout.home, labels={"example": "demo"},
                             rules=demo_rules(steps))
    probe.wait_ready()
    from gradwatch.probes.autostart import autostart_enabled

    # an agent being started takes a few seconds; with autostart off only one already running can answer
    url = _wait_for_agent(layout, timeout=20.0 if autostart_enabled() else 3.0)
    if url is None:  # without an agent no rule acts: the demo would only pretend
        probe.close(status="failed", error="no gradwatch agent answered")
        raise GradwatchError(_no_agent_message(layout))
    console.print(f"Run [bold]{probe.run}[/] is exported at [link]{url}/metrics[/link]  (runs as JSON: {url}/api/runs)")
    wanted = _configured_port()
    if not url.endswith(f":{wanted}"):
        console.print(f"[yellow]Port {wanted} was taken[/], so the agent listens on {url} instead; "
                      f"`gradwatch status` and the probes find it through the spool ({layout.agent_info_file}).")
    live = live and console.is_terminal  # a log or a pipe gets progress lines, not a live panel

    snap = _Snapshot(phase="training")
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
            if step == int(SPIKE_AT * steps):
                for group in optimizer.param_groups:
                    group["lr"] *= SPIKE_FACTOR
                snap.phase = f"[bold red]learning rate x{SPIKE_FACTOR:g}[/]"
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            if step == int(NAN_AT * steps):
                loss = loss * float("nan")  # one bad batch: the skip-step guard keeps it out of the weights
            optimizer.zero_grad()
            loss.backward()
            if steps_per_second > 0:  # the pace is the step's compute (what a GPU step costs), not a wait for data
                time.sleep(max(0.0, started + (step + 1) / steps_per_second - time.monotonic()))
            optimizer.step()
            values = {"loss": loss, "batch_size": len(xb)}
            if (step + 1) % VAL_EVERY == 0:
                with torch.no_grad():
                    values["val_loss"] = torch.nn.functional.mse_loss(model(x_val), y_val)
            probe.log(**values)
            snap.step = step + 1
            snap.lr = optimizer.param_groups[0]["lr"]
            if snap.lr < BASE_LR * SPIKE_FACTOR and step > SPIKE_AT * steps:
                snap.phase = "recovering"
            if probe.should_stop:
                console.print(f"[bold green]stopped early[/] after step {snap.step}: {probe.stop_reason}")
                break
            progress.update(task, completed=snap.step)
            if live and time.monotonic() >= next_agent_poll:
                snap.loss = float(loss.detach())  # the demo's own display; the probe never reads values here
                snap.agent = _agent_view(url, probe.run)
                next_agent_poll = time.monotonic() + 0.5
                display.update(_panel(snap, progress, url))
            elif not live and snap.step % max(1, steps // 20) == 0:
                console.print(f"step {snap.step:5d}/{steps}  loss {float(loss.detach()):10.4g}  lr {snap.lr:.3g}  "
                              f"{_strip_markup(snap.phase)}")
    probe.close()
    _finish(console, url, probe.run, probe.step, layout)


def _finish(console: Console, url: str | None, run: str, steps: int, layout: SpoolLayout) -> None:
    view = None
    deadline = time.monotonic() + 10
    while url and time.monotonic() < deadline:  # let the agent ingest the last records
        view = _agent_view(url, run)
        if view and view["status"] == "finished" and view["ranks"][0]["steps"] == steps:
            break
        time.sleep(0.2)
    if view:
        view = safe(view)  # its strings came through the spool: escaped for the terminal
        console.print(runs_table([view], "what the agent exported"))
        spikes = view["ranks"][0]["spikes"]
        console.print(f"Spikes detected at step resolution: loss {spikes['loss']}, grad norm {spikes['grad_norm']} "
                      f"(gradwatch_spikes_total).")
        console.print("What gradwatch did:")
        for action in view["ranks"][0].get("recent_actions", []):
            console.print(f"  {_steps(action):<15} {action['action']:<10} {action['reason']:<20} {action['detail']}")
        alerts = view.get("alerts") or []
        if alerts:
            console.print("Alerts firing (what Alertmanager or your webhook would get with --alertmanager-url / "
                          "--webhook-url; docs/alerts.md):")
            for alert in alerts:
                console.print(f"  {alert['severity']:<9} {alert['alertname']}: {alert['summary']}", soft_wrap=True)
    console.print("\nNext:")
    if url:
        console.print(f"  curl -s {url}/metrics | grep gradwatch_loss")
    console.print("  gradwatch status")
    console.print(f"  the decisions and what became of them: {layout.run_dir(run) / 'events.jsonl'}")
    console.print(f"  the spool of this run: {layout.run_dir(run)}")


def _steps(action: dict[str, Any]) -> str:
    if action.get("count", 1) > 1:
        return f"steps {action['step']}-{action['to_step']}"
    return f"step {action['step']}"


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
