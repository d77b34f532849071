"""GradwatchCallback in a real Transformers Trainer run on CPU (tiny random GPT-2, random tokens;
tests/support/hf_script.py): the values gradwatch records equal the Trainer's log history; actions
go through TrainerControl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.frameworks.helpers import ACT_EARLY, acks, assert_resumed_from, records, run_script


def test_loss_grad_norm_and_lr_equal_the_trainers_log_with_accumulation(isolated_home: Path, tmp_path: Path) -> None:
    run_script("hf_script.py", isolated_home, str(tmp_path), "--steps", "12", "--accumulate", "2")
    history = [e for e in json.loads((tmp_path / "result.json").read_text())["log_history"] if "loss" in e]
    assert [e["step"] for e in history] == list(range(1, 13))
    steps = records(isolated_home, "hf")
    assert [r["step"] for r in steps] == list(range(1, 13))
    # the Trainer's loss: the mean over the step's micro-batches; its grad_norm: before clipping to 1.0
    assert [r["values"]["loss"] for r in steps] == pytest.approx([e["loss"] for e in history], rel=1e-6)
    assert [r["grad_norm"] for r in steps] == pytest.approx([e["grad_norm"] for e in history], rel=1e-6)
    assert all(r["clip"] == 1.0 for r in steps)  # the Trainer's max_grad_norm, and which steps it clipped
    assert [r["clipped"] for r in steps] == [e["grad_norm"] + 1e-6 > 1.0 for e in history]
    assert [r["lr"][0] for r in steps] == pytest.approx([e["learning_rate"] for e in history], rel=1e-9, abs=1e-12)
    assert records(isolated_home, "hf", kind="layers")


@pytest.mark.integration
def test_actions_go_through_trainer_control(agent_process: Any, isolated_home: Path, tmp_path: Path) -> None:
    agent_process()
    rules = tmp_path / "rules.yaml"
    rules.write_text(ACT_EARLY)
    run_script("hf_script.py", isolated_home, str(tmp_path), "--steps", "400", "--rules", str(rules),
               "--sleep", "0.02")
    result = json.loads((tmp_path / "result.json").read_text())
    assert 20 <= result["global_step"] < 400 and "rule give-up" in result["stop_reason"]
    assert result["max_grad_norm"] == 0.5
    assert records(isolated_home, "hf", kind="end")[0]["status"] == "stopped"
    applied = acks(isolated_home, "hf")
    # the linear schedule goes on setting its LR; every update after the cut uses half of it
    scheduled = {e["step"]: e["learning_rate"] for e in result["log_history"] if "learning_rate" in e}
    after_cut = [r for r in records(isolated_home, "hf") if r["step"] > applied["reduce_lr"]["step"]]
    assert len(after_cut) >= 10
    assert [r["lr"][0] for r in after_cut] == pytest.approx([0.5 * scheduled[r["step"]] for r in after_cut], rel=1e-9)
    assert {k: v["status"] for k, v in applied.items()} == {"reduce_lr": "applied", "scale_clip": "applied",
                                                            "stop": "applied"}


def test_train_from_a_checkpoint_continues_the_run_and_its_steps(isolated_home: Path, tmp_path: Path) -> None:
    """``train(resume_from_checkpoint=True)`` finds the probe's state in the checkpoint's trainer_state.json (the
    callback is a stateful one): the same run, even with another run= this time, and the steps from its global
    step; also when restore_callback_states_from_checkpoint makes the Trainer rebuild the callback from there."""
    run_script("hf_script.py", isolated_home, str(tmp_path), "--steps", "12", "--save-every", "8")
    run_script("hf_script.py", isolated_home, str(tmp_path), "--steps", "20", "--save-every", "8", "--resume",
               "--run", "another-name")
    assert json.loads((tmp_path / "result.json").read_text())["run"] == "hf"
    assert [p.name for p in (isolated_home / "runs").iterdir()] == ["hf"]
    assert_resumed_from(isolated_home, "hf", 12, 20)
    run_script("hf_script.py", isolated_home, str(tmp_path), "--steps", "28", "--save-every", "8", "--resume",
               "--run", "another-name", "--restore-callbacks")
    assert json.loads((tmp_path / "result.json").read_text())["run"] == "hf"
    assert_resumed_from(isolated_home, "hf", 20, 28, segment=2)
