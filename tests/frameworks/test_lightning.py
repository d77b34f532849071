"""GradwatchCallback in real Lightning training on CPU (tests/support/lightning_script.py): the values
gradwatch records equal those Lightning logs; actions go through the Trainer, under DDP too."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SUPPORT
from tests.frameworks.helpers import ACT_EARLY, acks, assert_resumed_from, records, run_script


def lightning_logs(out: Path) -> dict[str, dict[int, float]]:
    """Lightning's CSVLogger metrics by name, then by optimizer step (its `step` column + 1)."""
    logged: dict[str, dict[int, float]] = {}
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name not in ("step", "epoch") and value != "":
                    logged.setdefault(name, {})[int(row["step"]) + 1] = float(value)
    return logged


def test_loss_grad_norm_and_lr_equal_what_lightning_logs(isolated_home: Path, tmp_path: Path) -> None:
    run_script("lightning_script.py", isolated_home, str(tmp_path), "--steps", "30")
    logged = lightning_logs(tmp_path)
    steps = records(isolated_home, "lightning")
    assert [r["step"] for r in steps] == list(range(1, 31))
    by_step = {r["step"]: r for r in steps}
    for name, ours in (("train_loss", lambda r: r["values"]["loss"]), ("grad_norm", lambda r: r["grad_norm"]),
                       ("lr-SGD", lambda r: r["lr"][0])):
        assert sorted(logged[name]) == list(range(1, 31)), name
        assert [ours(by_step[s]) for s in range(1, 31)] == pytest.approx(
            [logged[name][s] for s in range(1, 31)], rel=1e-6), name
    assert all(r["values"]["batch_size"] == 32 for r in steps)
    assert records(isolated_home, "lightning", kind="layers")  # per-layer statistics every 10 steps
    assert records(isolated_home, "lightning", kind="end")[0]["status"] == "finished"


def test_an_unmodified_lightning_script_under_gradwatch_run_records_the_same_values(isolated_home: Path,
                                                                                     tmp_path: Path) -> None:
    """No callback: Lightning runs the backward pass inside optimizer.step(closure); the zero-code probe
    measures the gradients after that step instead of the stale ones before it."""
    run_script("-m", isolated_home, "gradwatch", "run", "--run", "plain-lightning", "--",
               sys.executable, str(SUPPORT / "lightning_script.py"), str(tmp_path), "--steps", "10", "--no-callback")
    logged = lightning_logs(tmp_path)
    steps = records(isolated_home, "plain-lightning")
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert [r["grad_norm"] for r in steps] == pytest.approx([logged["grad_norm"][s] for s in range(1, 11)], rel=1e-6)
    assert [r["values"]["loss"] for r in steps] == pytest.approx([logged["train_loss"][s] for s in range(1, 11)],
                                                                  rel=1e-6)
    assert [r["lr"][0] for r in steps] == pytest.approx([logged["lr-SGD"][s] for s in range(1, 11)], rel=1e-9)


@pytest.mark.parametrize("attached", ["callback", "gradwatch-run"])
def test_with_the_trainers_clipping_the_recorded_norm_is_the_one_before_it(attached: str, isolated_home: Path,
                                                                           tmp_path: Path) -> None:
    args = (str(tmp_path), "--steps", "10", "--clip-val", "0.1")
    if attached == "callback":
        run = "lightning"
        run_script("lightning_script.py", isolated_home, *args)
    else:
        run = "clipped-lightning"
        run_script("-m", isolated_home, "gradwatch", "run", "--run", run, "--", sys.executable,
                   str(SUPPORT / "lightning_script.py"), *args, "--no-callback")
    logged = lightning_logs(tmp_path)["grad_norm"]  # lightning's grad_norm in on_before_optimizer_step
    steps = records(isolated_home, run)
    assert [r["grad_norm"] for r in steps] == pytest.approx([logged[s] for s in range(1, 11)], rel=1e-6)
    assert all(r["grad_norm"] > 0.1 for r in steps)  # not the clipped 0.1
    assert all(r["clip"] == 0.1 and r["clipped"] for r in steps)


@pytest.mark.integration
def test_ddp_with_accumulation_records_the_global_norm_at_each_optimizer_step(isolated_home: Path,
                                                                               tmp_path: Path) -> None:
    run_script("lightning_script.py", isolated_home, str(tmp_path), "--steps", "12", "--devices", "2",
               "--accumulate", "2")
    logged = lightning_logs(tmp_path)  # rank 0 logs
    ranks = [records(isolated_home, "lightning", rank) for rank in (0, 1)]
    assert [len(r) for r in ranks] == [12, 12]
    norms = [[r["grad_norm"] for r in rank] for rank in ranks]
    assert norms[0] == pytest.approx([logged["grad_norm"][s] for s in range(1, 13)], rel=1e-6)
    assert norms[1] == pytest.approx(norms[0], rel=1e-6)  # gradients all-reduced: one global norm
    assert all(r["values"]["batch_size"] == 64 for r in ranks[0])  # 2 batches of 32 per optimizer step


@pytest.mark.integration
def test_actions_go_through_the_trainer_on_every_ddp_rank(agent_process: Any, isolated_home: Path,
                                                          tmp_path: Path) -> None:
    agent_process()
    rules = tmp_path / "rules.yaml"
    rules.write_text(ACT_EARLY)
    run_script("lightning_script.py", isolated_home, str(tmp_path), "--steps", "400", "--devices", "2",
               "--clip-val", "1.0", "--rules", str(rules), "--sleep", "0.02")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["should_stop"] and 20 <= result["global_step"] < 400
    assert "rule give-up" in result["stop_reason"]
    for rank in (0, 1):
        applied = acks(isolated_home, "lightning", rank)
        assert {k: v["status"] for k, v in applied.items()} == {"reduce_lr": "applied", "scale_clip": "applied",
                                                                "stop": "applied"}, applied
        assert applied["scale_clip"]["detail"] == "the trainer's clip threshold now 0.5 (the next clip used it)"
    assert result["gradient_clip_val"] == 0.5  # the Trainer's own clipping was tightened
    # the warm-up schedule goes on setting its LR (LearningRateMonitor logs it); every update after the cut
    # uses half of it
    scheduled = lightning_logs(tmp_path)["lr-SGD"]
    cut_at = acks(isolated_home, "lightning", 0)["reduce_lr"]["step"]
    after_cut = [r for r in records(isolated_home, "lightning") if r["step"] > cut_at]
    assert len(after_cut) >= 10
    assert [r["lr"][0] for r in after_cut] == pytest.approx([0.5 * scheduled[r["step"]] for r in after_cut], rel=1e-9)
    ends = [records(isolated_home, "lightning", rank, kind="end")[0] for rank in (0, 1)]
    assert [e["status"] for e in ends] == ["stopped", "stopped"]
    assert ends[0]["step"] == ends[1]["step"] == result["global_step"]  # both ranks left after the same step


def test_fit_from_a_checkpoint_continues_the_run_and_its_steps(isolated_home: Path, tmp_path: Path) -> None:
    """``fit(ckpt_path=...)`` restores the callback's state from Lightning's checkpoint: the same run (even with
    another run= this time) and the step series from the checkpoint's global step."""
    run_script("lightning_script.py", isolated_home, str(tmp_path), "--steps", "30", "--checkpoint-every", "10")
    run_script("lightning_script.py", isolated_home, str(tmp_path), "--steps", "50", "--run", "another-name",
               "--resume", str(tmp_path / "ckpt" / "epoch=0-step=20.ckpt"))
    assert json.loads((tmp_path / "result.json").read_text())["run"] == "lightning"
    assert [p.name for p in (isolated_home / "runs").iterdir()] == ["lightning"]
    assert_resumed_from(isolated_home, "lightning", 20, 50)


def test_ctrl_c_during_fit_ends_the_run_as_interrupted(isolated_home: Path, tmp_path: Path) -> None:
    """Lightning catches the KeyboardInterrupt, shuts down and exits with status 1: the run is interrupted."""
    import os
    import subprocess

    done = subprocess.run([sys.executable, str(SUPPORT / "lightning_script.py"), str(tmp_path), "--steps", "100",
                           "--ctrl-c-at", "10"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GRADWATCH_HOME": str(isolated_home), "GRADWATCH_AUTOSTART": "0"})
    assert done.returncode == 1 and "Detected KeyboardInterrupt" in done.stderr + done.stdout
    assert [(e["step"], e["status"]) for e in records(isolated_home, "lightning", kind="end")] == [(10, "interrupted")]


def test_fit_from_a_checkpoint_without_gradwatch_state_numbers_steps_from_the_global_step(
        isolated_home: Path, tmp_path: Path) -> None:
    """A checkpoint saved before gradwatch was added: the run named run= continues after the checkpoint's
    global_step (no saved state: a resume record without a checkpoint id)."""
    run_script("lightning_script.py", isolated_home, str(tmp_path), "--steps", "20", "--checkpoint-every", "10",
               "--no-callback")
    assert not (isolated_home / "runs").exists()
    run_script("lightning_script.py", isolated_home, str(tmp_path), "--steps", "30",
               "--resume", str(tmp_path / "ckpt" / "epoch=0-step=20.ckpt"))
    [resume] = records(isolated_home, "lightning", kind="resume")
    assert (resume["step"], resume["checkpoint"]) == (20, "")
    assert [r["step"] for r in records(isolated_home, "lightning")] == list(range(21, 31))
