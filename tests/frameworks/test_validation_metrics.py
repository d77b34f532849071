"""What the frameworks log besides the training loss reaches the rules: Lightning's callback metrics
(validation, epoch ends) under both package names, the Trainer's ``eval_*`` logs (``eval_loss`` also as
``val_loss``); and gradwatch's early stopping stops where Lightning's own ``EarlyStopping`` does, when
improvements land exactly on ``min_delta``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gradwatch.spool.format import SpoolLayout
from tests.conftest import wait_until
from tests.frameworks.helpers import records, run_script
from tests.spool_records import run_records

EARLY_STOP = """
rules:
  - name: score-early-stop
    metric: val_score
    detect: {type: early_stopping, mode: max, min_delta: 0.1, patience: 1}
    action: {type: stop}
    mode: observe
"""


def _decisions(home: Path, run: str, rule: str) -> list[dict[str, Any]]:
    path = SpoolLayout.events_file(SpoolLayout(home).run_dir(run))
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in events if e["event"] == "decision" and e["rule"] == rule]


@pytest.mark.integration
@pytest.mark.parametrize("namespace", ["lightning", "pytorch_lightning"])
def test_early_stopping_decides_where_lightnings_own_does(namespace: str, agent_process: Any, isolated_home: Path,
                                                          tmp_path: Path) -> None:
    """mode=max, min_delta=0.1, validation scores 0.0, 0.1, 0.2, ...: in float32 0.1 - 0.1 is no
    improvement, so Lightning stops at the second validation; gradwatch used to say one later."""
    agent_process()
    rules = tmp_path / "rules.yaml"
    rules.write_text(EARLY_STOP)
    out = tmp_path / "out"
    run_script("user_scripts/lightning_validation.py", isolated_home, str(out), "--namespace", namespace,
               "--mode", "max", "--min-delta", "0.1", "--patience", "1", "--values", "0.0,0.1,0.2,0.3,0.4,0.5",
               "--rules", str(rules))
    result = json.loads((out / "result.json").read_text())
    assert result["stopped_epoch"] == 1  # Lightning's decision on this sequence
    stop_step = result["steps_at"][result["stopped_epoch"]]
    decisions = wait_until(lambda: _decisions(isolated_home, "validation", "score-early-stop"), timeout=30,
                           what="the agent's early-stopping decision")
    assert [d["step"] for d in decisions] == [stop_step]
    # every scalar Lightning logged reached the run under its own name, once per validation
    logged = [r["values"] for r in run_records(isolated_home, "validation") if "val_loss" in r.get("values", {})]
    assert len(logged) == len(result["steps_at"]) and all("val_score" in v and "train_loss" in v for v in logged)


@pytest.mark.integration
def test_the_shipped_early_stopping_rule_works_on_lightnings_val_loss(agent_process: Any, isolated_home: Path,
                                                                     tmp_path: Path) -> None:
    """No rules of ours: the agent's packaged val-loss-early-stop (Lightning's defaults, patience 3) watches the
    val_loss the script logs with self.log and decides where Lightning's EarlyStopping(patience=3) stops."""
    agent_process()
    out = tmp_path / "out"
    run_script("user_scripts/lightning_validation.py", isolated_home, str(out), "--score-name", "val_loss",
               "--mode", "min", "--min-delta", "0", "--patience", "3", "--values", "1.0,0.9,0.9,0.9,0.9,0.9,0.9")
    result = json.loads((out / "result.json").read_text())
    stop_step = result["steps_at"][result["stopped_epoch"]]
    decisions = wait_until(lambda: _decisions(isolated_home, "validation", "val-loss-early-stop"), timeout=30,
                           what="the packaged rule's decision")
    assert [d["step"] for d in decisions] == [stop_step] and decisions[0]["mode"] == "observe"


def test_the_trainers_eval_metrics_reach_the_run_and_its_validation_rules(isolated_home: Path, tmp_path: Path) -> None:
    run_script("hf_script.py", isolated_home, str(tmp_path), "--steps", "12", "--eval-every", "4")
    history = json.loads((tmp_path / "result.json").read_text())["log_history"]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    assert [step for step, _ in evals] == [4, 8, 12]
    ours = [(r["step"], r["values"]) for r in run_records(isolated_home, "hf") if "eval_loss" in r.get("values", {})]
    assert [step for step, _ in ours] == [4, 8, 12]
    assert [v["eval_loss"] for _, v in ours] == pytest.approx([loss for _, loss in evals], rel=1e-6)
    assert all(v["val_loss"] == v["eval_loss"] and "eval_runtime" in v for _, v in ours)  # the shipped rules' name
    assert all("grad_norm" not in (r.get("values") or {}) for r in records(isolated_home, "hf"))
