"""``gradwatch runs ls | rm | prune``: what the spool holds, and removing what is no longer needed.

A run is removed as a whole directory (records, metadata, commands, the agent's events). A run that may still
be written (no end record, and its process lives or this machine cannot tell) is kept unless asked with
``--force``: removing it under a live probe would lose what it writes next. The agent forgets a removed run's
series once it sees the directory gone.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradwatch.errors import GradwatchError
from gradwatch.history import RunHistory, RunNotFound, age_seconds, iter_runs, read_run

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_KEPT_WHILE = ("running", "unknown")  # may still be written


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``2w``, ``3600s`` -> seconds; GradwatchError naming the value otherwise."""
    match = _AGE.match(text)
    if match is None:
        raise GradwatchError(f"--older-than {text!r}: give a number and a unit, e.g. 30d, 12h, 90m, 2w")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def summary(run: RunHistory, now: float) -> dict[str, Any]:
    return {"run": run.name, "status": run.status, "ranks": len(run.ranks),
            "steps": max((r.steps[-1].step for r in run.ranks.values() if r.steps), default=0),
            "last_record_age_seconds": age_seconds(run, now), "size_bytes": run.size_bytes,
            "path": str(run.path)}


def runs_list(home: str | Path | None) -> list[dict[str, Any]]:
    now = time.time()
    return [summary(run, now) for run in iter_runs(home)]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for limit, unit in ((120, "s"), (7200, "m"), (172800, "h")):
        if seconds < limit:
            return f"{seconds / _UNIT_SECONDS[unit]:.0f}{unit} ago"
    return f"{seconds / 86400:.0f}d ago"


def print_runs_list(listing: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from gradwatch.status import make_console

    console = make_console()
    if not listing:
        console.print("no runs in the spool")
        return
    table = Table(box=None, pad_edge=False)
    for column, justify in (("run", "left"), ("status", "left"), ("ranks", "right"), ("steps", "right"),
                            ("last record", "right"), ("size", "right")):
        table.add_column(column, justify=justify, no_wrap=column != "run", overflow="fold")  # type: ignore[arg-type]
    for row in listing:
        table.add_row(row["run"], row["status"], str(row["ranks"]), str(row["steps"]),
                      _human_age(row["last_record_age_seconds"]), _human_bytes(row["size_bytes"]))
    console.print(table)
    total = sum(row["size_bytes"] for row in listing)
    console.print(f"{len(listing)} run(s), {_human_bytes(total)}")


def _remove(run: RunHistory, echo: Callable[[str], None]) -> int:
    size = run.size_bytes
    shutil.rmtree(run.path)
    echo(f"removed {run.name} ({_human_bytes(size)})")
    return size


def remove_runs(names: list[str], home: str | Path | None, *, force: bool,
                confirm: Callable[[str], bool] | None, echo: Callable[[str], None]) -> None:
    """Remove the named runs. A missing name or a live run (without ``force``) stops before anything is removed."""
    runs = []
    for name in names:
        run = read_run(name, home)  # RunNotFound names the runs there are
        if run.status in _KEPT_WHILE and not force:
            why = "no end record" + (", its process lives" if run.status == "running" else "")
            raise GradwatchError(f"run {name!r} is {run.status} ({why}); removing it would lose what its probe writes "
                                 "next. Use --force to remove it anyway")
        runs.append(run)
    if confirm is not None and not confirm(f"remove {len(runs)} run(s): {', '.join(r.name for r in runs)}?"):
        echo("nothing removed")
        return
    freed = sum(_remove(run, echo) for run in runs)
    echo(f"{len(runs)} run(s) removed, {_human_bytes(freed)} freed")


def prune_runs(home: str | Path | None, older_than: float, *, dry_run: bool,
               confirm: Callable[[str], bool] | None, echo: Callable[[str], None]) -> list[str]:
    """Remove the runs that ended (or crashed) and whose last record is older than ``older_than`` seconds; returns
    their names. Runs that may still be written are kept whatever their age."""
    now = time.time()
    old = []
    for run in iter_runs(home):
        age = age_seconds(run, now)
        if run.status not in _KEPT_WHILE and age is not None and age > older_than:
            old.append(run)
    if not old:
        echo(f"no ended run older than {_human_age(older_than).removesuffix(' ago')}")
        return []
    for run in old:
        echo(f"{'would remove' if dry_run else 'removing'} {run.name}: {run.status}, last record "
             f"{_human_age(age_seconds(run, now))}, {_human_bytes(run.size_bytes)}")
    if dry_run:
        return [run.name for run in old]
    if confirm is not None and not confirm(f"remove these {len(old)} run(s)?"):
        echo("nothing removed")
        return []
    freed = 0
    for run in old:
        try:
            freed += _remove(run, echo)
        except FileNotFoundError:  # removed meanwhile
            continue
    echo(f"{len(old)} run(s) removed, {_human_bytes(freed)} freed")
    return [run.name for run in old]


__all__ = ["RunNotFound", "parse_age", "print_runs_list", "prune_runs", "remove_runs", "runs_list"]
