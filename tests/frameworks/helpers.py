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
