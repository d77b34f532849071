"""``gradwatch status``: ask the agent for its runs (or read the spool when none runs) and show a table."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gradwatch.spool.format import SpoolLayout, default_home
from gradwatch.terminal import safe

_STATUS_STYLE = {"running": "green", "stalled": "yellow", "crashed": "red", "failed": "red", "interrupted": "magenta",
                 "finished": "blue", "rejected": "red"}


def agent_url(layout: SpoolLayout) -> str | None:
    try:
        info = json.loads(layout.agent_info_file.read_text())
        return str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def get_json(url: str, timeout: float = 3.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def fetch_runs(home: Path | None = None, url: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Runs from the agent at ``url`` (or the one serving ``home``); else read the spool directly."""
    layout = SpoolLayout(home or default_home())
    target = url or agent_url(layout)
    if target:
        try:
            return get_json(target.rstrip("/") + "/api/runs")["runs"], f"agent {target}"
        except (OSError, ValueError, KeyError):
            if url:
                from gradwatch.errors import GradwatchError

                raise GradwatchError(f"no gradwatch agent answers at {url}; check the URL or run `gradwatch agent`") from None
    return read_spool_runs(layout), f"spool {layout.home} (no agent running)"


def read_spool_runs(layout: SpoolLayout) -> list[dict[str, Any]]:
    """Replay the spool in-process, read-only (no checkpoint is written)."""
    import socket

    from gradwatch.agent.ingest import SpoolIngestor
    from gradwatch.agent.state import AgentState

    state = AgentState(spike_window=60.0)
    SpoolIngestor(layout, state, time.time).scan_all()
    state.refresh(time.time(), stall_after=120.0, ended_ttl=float("inf"), local_host=socket.gethostname())
    return state.summary(time.time())


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


_ESSENTIAL = ("run", "state", "steps", "loss", "grad norm", "lr")  # kept at any width
_OPTIONAL = ("step time", "last record", "rank", "samples/s", "actions")  # added in this order while they fit
_ORDER = ("run", "rank", "state", "steps", "loss", "grad norm", "lr", "step time", "samples/s", "actions",
          "last record")
_LEFT = ("run", "state", "actions")


def _rows(runs: list[dict[str, Any]], show: Sequence[str] = ()) -> list[dict[str, str]]:
    rows = []
    for run in runs:
        if not run["ranks"]:
            rows.append({"run": run["run"], "rank": "-", "state": f"[red]{run['status']}[/]",
                         "last record": run.get("error", "")})
            continue
        for i, r in enumerate(run["ranks"]):
            style = _STATUS_STYLE.get(r["status"], "")
            lrs = r.get("learning_rates") or []
            rows.append({
                "run": run["run"] if i == 0 else "", "rank": str(r["rank"]), "state": _state(r, style),
                "steps": str(r["steps"]), "loss": _fmt(r["loss"]), "grad norm": _fmt(r["grad_norm"]),
                "lr": _fmt(lrs[0], ".3g") + (f" (+{len(lrs) - 1})" if len(lrs) > 1 else "") if lrs
                else ("none*" if r.get("steps_from") == "backward" else "-"),
                "step time": "-" if r["step_duration_seconds"] is None else f"{r['step_duration_seconds'] * 1000:.1f} ms",
                "samples/s": _fmt(r["samples_per_second"], ".1f"), "actions": actions_text(r),
                "last record": _ago(r.get("seconds_since_last_record")),
                **{name: _fmt((r.get("metrics") or {}).get(name)) for name in show},
            })
    return rows


def _width(column: str, rows: list[dict[str, str]]) -> int:
    from rich.text import Text

    return max([len(column)] + [Text.from_markup(row.get(column, "")).cell_len for row in rows])


def runs_table(runs: list[dict[str, Any]], title: str, width: int | None = None, show: Sequence[str] = ()) -> Table:
    """The runs, one row per rank. At ``width`` columns (a terminal's), run, state, steps, loss, grad norm and lr
    always show (a long run name is cut with an ellipsis, never to nothing); step time, last record, rank (when a
    run has several), samples/s and actions follow while they fit. ``show``: logged scalars (``val_loss``) as
    columns of their own, after the essential ones."""
    rows = _rows(runs, show)
    order = _ORDER[:7] + tuple(show) + _ORDER[7:]
    widths = {column: _width(column, rows) for column in order}
    shown = set(_ESSENTIAL) | set(show)
    several_ranks = any(len(run["ranks"]) > 1 for run in runs)
    if width is not None:
        widths["run"] = min(widths["run"], max(12, width // 4))
        used = sum(widths[c] + 3 for c in shown) + 1
        for column in _OPTIONAL:
            if column == "rank" and not several_ranks:
                continue
            if used + widths[column] + 3 <= width:
                shown.add(column)
                used += widths[column] + 3
    else:
        shown.update(_OPTIONAL)
    table = Table(title=title, title_justify="left", header_style="bold")
    columns = [c for c in order if c in shown]
    for column in columns:
        table.add_column(column, justify="left" if column in _LEFT else "right",
                         no_wrap=True, overflow="ellipsis", min_width=min(widths[column], 12 if column == "run" else 6),
                         max_width=widths[column] if column == "run" and width is not None else None)
    for row in rows:
        table.add_row(*(row.get(column, "") for column in columns))
    return table


def _state(rank: dict[str, Any], style: str) -> str:
    state = rank["status"] + (" (stopped by a rule)" if rank.get("end_status") == "stopped" else "")
    if rank["status"] == "failed" and rank.get("exit_code") is not None:
        state += f" (exit {rank['exit_code']})"
    if rank.get("resumes"):
        state += " (resumed)" if rank["resumes"] == 1 else f" (resumed x{rank['resumes']})"
    if rank.get("history"):
        state += " (history)"
    return f"[{style}]{state}[/]" if style else state


_ACTION_SHORT = {"stop": "stopped", "reduce_lr": "lr cut", "scale_clip": "clip scaled", "rewind": "rewound",
                 "skip_step": "skipped"}


def actions_text(rank: dict[str, Any]) -> str:
    """What was done to one rank, e.g. ``lr cut x2, skipped x1, clip 1.2 (8% clipped)``."""
    counts: dict[str, int] = {}
    for key, n in (rank.get("actions") or {}).items():
        action = key.split(":", 1)[0]
        counts[action] = counts.get(action, 0) + n
    parts = [_ACTION_SHORT.get(a, a) + ("" if a == "stop" else f" x{n}") for a, n in sorted(counts.items())]
    if rank.get("clip_threshold") is not None:
        fraction = rank.get("clipped_fraction")
        parts.append(f"clip {rank['clip_threshold']:.3g}" + (f" ({fraction:.0%} clipped)" if fraction else ""))
    return ", ".join(parts) or "-"


def make_console() -> Console:
    """A console that does not squeeze tables into 80 columns when output goes to a file or pipe."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # a row with every action listed is ~170 columns
    return console


def watch_runs(home: Path | None, url: str | None, every: float, show: Sequence[str] = ()) -> None:
    """``gradwatch status --watch``: the table redrawn in place every ``every`` seconds (plain ANSI, fine over SSH),
    until Ctrl-C; without a terminal, one table per interval, for a log."""
    from rich.live import Live

    console = make_console()

    def table() -> Table:
        runs, source = fetch_runs(home=home, url=url)
        return runs_table(safe(runs), f"gradwatch runs ({source}, every {every:g} s; Ctrl-C to stop)",
                          width=console.width if console.is_terminal else None, show=show)

    try:
        if not console.is_terminal:
            while True:
                console.print(table())
                time.sleep(every)
        with Live(table(), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(every)
                live.update(table(), refresh=True)
    except KeyboardInterrupt:
        return


def print_runs(runs: list[dict[str, Any]], source: str, show: Sequence[str] = ()) -> None:
    console = make_console()
    runs = safe(runs)  # every string from the spool, escaped for the terminal
    if not runs:
        console.print(f"No runs yet ({source}). Add [bold]gradwatch.attach(model, optimizer)[/] to a training script.")
        return
    console.print(runs_table(runs, "gradwatch runs", width=console.width if console.is_terminal else None, show=show))
    if any(r.get("steps_from") == "backward" for run in runs for r in run["ranks"]):
        console.print("[dim]* no torch.optim optimizer: the script updates its parameters by hand, so there is no "
                      "learning rate to read, and each backward pass counts as a step[/]", soft_wrap=True)
    for run in runs:
        for rule, metric in ((run.get("rules") or {}).get("unseen_metrics") or {}).items():
            console.print(f"[yellow]note[/]: run {run['run']}: rule {rule} watches metric {metric!r}, which the run "
                          "has not recorded; it cannot fire (a typo? see `gradwatch rules check`)", soft_wrap=True)
    alerts = [a for r in runs for a in r.get("alerts") or []]
    if alerts:
        colour = {"critical": "red", "warning": "yellow"}
        console.print(f"[bold]{len(alerts)} alert(s) firing[/]")
        for a in sorted(alerts, key=lambda a: ("critical", "warning", "info").index(a["severity"])
                        if a["severity"] in ("critical", "warning", "info") else 3):
            style = colour.get(a["severity"], "blue")
            console.print(f"  [{style}]{a['severity']:8s}[/] {a['alertname']}: {a['summary']}", soft_wrap=True)
    diagnoses = diagnoses_of(runs)
    if diagnoses:
        console.print(f"[bold]{len(diagnoses)} diagnosis(es)[/] (the catalogue's rules: docs/rules.md)")
        for name, text in diagnoses:
            console.print(f"  {name}: {text}", soft_wrap=True)
    console.print(f"[dim]from {source}[/]", soft_wrap=True)


def diagnoses_of(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The newest firing of each catalogue rule of each run, in words (its evidence), unless an alert firing
    now says it already."""
    said = {str(a.get("summary", "")) for entry in runs for a in entry.get("alerts") or []}
    out = []
    for run in runs:
        newest: dict[str, str] = {}
        for decision in (run.get("rules") or {}).get("recent_decisions") or []:
            evidence = decision.get("evidence")
            if isinstance(evidence, str) and evidence:
                newest[str(decision.get("rule"))] = evidence
        out += [(run["run"], text) for text in newest.values() if not any(text in summary for summary in said)]
    return out
