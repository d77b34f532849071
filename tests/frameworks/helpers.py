from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from gradwatch.spool.format import SpoolLayout
from tests.conftest import SUPPORT
from tests.spool_records import run_records

# a rules file making the agent act on each kind of action early in a short run
ACT_EARLY = """
rules:
  - name: cut-lr
    metric: loss
    detect: {type: threshold, above: 0}
    action: {type: reduce_lr, factor: 0.5}
    mode: act
    max_actions: 1
  - name: tighten-clip
    metric: loss
    detect: {type: threshold, above: 0}
    action: {type: scale_clip, factor: 0.5}
    mode: act
    max_actions: 1
  - name: give-up
    metric: loss
    detect: {type: early_stopping, patience: 20, min_delta: 1000}
    action: {type: stop}
    mode: act
"""


def run_script(name: str, home: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> None:
    """``python tests/support/<name> ARGS`` (or ``python -m ARGS`` when name is "-m"), to its end."""
    command = [sys.executable, "-m", *args] if name == "-m" else [sys.executable, str(SUPPORT / name), *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "GRADWATCH_HOME": str(home), "GRADWATCH_AUTOSTART": "0", **(env or {})},
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


def records(home: Path, run: str, rank: int = 0, kind: str = "step") -> list[dict[str, Any]]:
    return [r for r in run_records(home, run, rank) if r["kind"] == kind]


def acks(home: Path, run: str, rank: int = 0) -> dict[str, dict[str, Any]]:
    """The applied commands of one rank, by action type."""
    path = SpoolLayout.events_file(SpoolLayout(home).run_dir(run))
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return {(a if isinstance(a := e["action"], str) else a["type"]): e for e in events
            if e["event"] == "ack" and e["rank"] == rank}


def segments(home: Path, run: str, rank: int = 0) -> list[list[dict[str, Any]]]:
    """The records of a run split at its resume records: one list per process that wrote them, in order."""
    out: list[list[dict[str, Any]]] = [[]]
    for record in run_records(home, run, rank):
        if record["kind"] == "resume":
            out.append([])
        out[-1].append(record)
    return out


def assert_resumed_from(home: Path, run: str, checkpoint_step: int, last_step: int, segment: int = 1) -> None:
    """The run's ``segment``-th resumed process continued after ``checkpoint_step`` (the state saved in that
    checkpoint) to ``last_step``; the process before it had saved that state at that step."""
    parts = segments(home, run)
    assert len(parts) == segment + 1
    first, second = parts[segment - 1], parts[segment]
    resume = second[0]
    assert resume["kind"] == "resume" and resume["step"] == checkpoint_step
    saved = [r["id"] for r in first if r["kind"] == "checkpoint" and r["step"] == checkpoint_step]
    assert resume["checkpoint"] in saved, "the state came from the checkpoint the framework resumed from"
    assert [r["step"] for r in second if r["kind"] == "step"] == list(range(checkpoint_step + 1, last_step + 1))
    assert [r["status"] for r in second if r["kind"] == "end"] == ["finished"]
