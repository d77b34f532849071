"""An LR cut in a script whose scheduler sets the LR every step, under ``gradwatch run``: the cut sticks
(the launcher found the scheduler and scaled its base LRs), and its acknowledgement reports the LR in
effect before and after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.spool.format import SpoolLayout
from tests.conftest import SUPPORT, wait_until
from tests.spool_records import run_records


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "cosine"])
def test_a_cut_sticks_under_the_scripts_scheduler_and_reports_the_lr_in_effect(kind: str, isolated_home: Path,
                                                                              tmp_path: Path) -> None:
    run = f"sched-{kind}"
    out = tmp_path / "out"
    script = subprocess.Popen(
        [sys.executable, "-m", "gradwatch", "run", "--home", str(isolated_home), "--run", run, "--",
         sys.executable, str(SUPPORT / "user_scripts" / "scheduled.py"), str(out), kind, "--steps", "80"],
        env={**os.environ, "GRADWATCH_AUTOSTART": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = SpoolLayout(isolated_home).run_dir(run)
        wait_until(lambda: SpoolLayout.meta_file(run_dir, 0).exists(), timeout=60, what="the run to start")
        commands = SpoolLayout.commands_file(run_dir)  # what the agent would write
        commands.parent.mkdir(parents=True, exist_ok=True)
        commands.write_text(json.dumps({"id": "cut", "rule": "test", "reason": "test", "trigger_step": 1,
                                        "apply_at_step": None, "action": {"type": "reduce_lr", "factor": 0.5}}) + "\n")
        _, stderr = script.communicate(timeout=120)
        assert script.returncode == 0, stderr
    finally:
        if script.poll() is None:
            script.kill()
    reference = json.loads((out / "reference.json").read_text())
    used, schedule = reference["used"], reference["schedule"]
    ack = next(r for r in run_records(isolated_home, run) if r["kind"] == "ack")
    s = ack["step"]  # applied after step s: step s used used[s - 1], step s + 1 uses used[s]
    assert ack["status"] == "applied" and 1 <= s < 70
    assert used[:s] == pytest.approx(schedule[:s], rel=1e-12)  # untouched until the cut
    assert used[s:] == pytest.approx([0.5 * lr for lr in schedule[s:]], rel=1e-9)  # halved, and it stays
    assert ack["detail"] == f"lr {used[s - 1]:.6g}->{used[s]:.6g}"
