"""An LR cut holds whatever sets the LR: a torch scheduler that recomputes it every step, or the script
itself assigning ``param_group["lr"]`` at the top of each iteration (nanoGPT's warm-up + cosine), under
``gradwatch run`` and under ``attach``. The LR each update really used is measured from the update
(plain SGD in float64), the step records export that LR, the script keeps seeing its own values, and
the acknowledgement reports the LR in effect before and after the cut."""

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


def _run_with_a_cut(kind: str, home: Path, out: Path, run: str, attach: bool,
                    action: dict[str, object]) -> tuple[dict[str, list[float]], list[dict[str, object]]]:
    script_args = [str(SUPPORT / "user_scripts" / "scheduled.py"), str(out), kind, "--steps", "80"]
    if attach:
        command = [sys.executable, *script_args, "--attach"]
        env = {**os.environ, "GRADWATCH_AUTOSTART": "0", "GRADWATCH_HOME": str(home), "GRADWATCH_RUN": run}
    else:
        command = [sys.executable, "-m", "gradwatch", "run", "--home", str(home), "--run", run, "--",
                   sys.executable, *script_args]
        env = {**os.environ, "GRADWATCH_AUTOSTART": "0"}
    script = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = SpoolLayout(home).run_dir(run)
        wait_until(lambda: SpoolLayout.meta_file(run_dir, 0).exists(), timeout=60, what="the run to start")
        commands = SpoolLayout.commands_file(run_dir)  # what the agent would write
        commands.parent.mkdir(parents=True, exist_ok=True)
        commands.write_text(json.dumps({"id": "cut", "rule": "test", "reason": "test", "trigger_step": 1,
                                        "apply_at_step": None, "action": action}) + "\n")
        _, stderr = script.communicate(timeout=120)
        assert script.returncode == 0, stderr
    finally:
        if script.poll() is None:
            script.kill()
    return json.loads((out / "reference.json").read_text()), run_records(home, run)


@pytest.mark.parametrize(("kind", "attach"), [("hand", False), ("hand", True), ("lambda", False),
                                              ("onecycle", False), ("cosine", True)])
def test_a_cut_holds_whatever_sets_the_lr_and_the_records_show_the_lr_the_update_used(
        kind: str, attach: bool, isolated_home: Path, tmp_path: Path) -> None:
    run = f"sched-{kind}-{'attach' if attach else 'run'}"
    reference, records = _run_with_a_cut(kind, isolated_home, tmp_path / "out", run, attach,
                                         {"type": "reduce_lr", "factor": 0.5})
    used, schedule = reference["used"], reference["schedule"]
    ack = next(r for r in records if r["kind"] == "ack")
    s = ack["step"]  # applied after step s: step s used used[s - 1], step s + 1 uses used[s]
    assert ack["status"] == "applied" and 1 <= s < 70
    assert used[:s] == pytest.approx(schedule[:s], rel=1e-9)  # untouched until the cut
    assert used[s:] == pytest.approx([0.5 * lr for lr in schedule[s:]], rel=1e-9)  # halved, and it stays
    assert reference["set"] == pytest.approx(schedule, rel=1e-12), "the script still sees the LRs it set"
    # the script's own optimizer; the reference's shadow optimizer, stepped after training, has records of its own
    steps = [r for r in records if r["kind"] == "step" and "opt" not in r]
    assert [r["lr"][0] for r in steps] == pytest.approx(used, rel=1e-9), "the records hold the LR each update used"
    assert ack["detail"] == f"lr {used[s - 1]:.6g}->{used[s]:.6g}"


def test_a_cut_at_min_lr_is_acknowledged_as_not_taken_and_changes_nothing(isolated_home: Path,
                                                                         tmp_path: Path) -> None:
    reference, records = _run_with_a_cut("hand", isolated_home, tmp_path / "out", "at-min", False,
                                         {"type": "reduce_lr", "factor": 0.5, "min_lr": 1.0})
    ack = next(r for r in records if r["kind"] == "ack")
    assert ack["status"] == "not_taken" and "min_lr" in ack["detail"]
    assert reference["used"] == pytest.approx(reference["schedule"], rel=1e-9)
