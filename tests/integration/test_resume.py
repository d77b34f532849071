"""A plain training loop preempted (SIGTERM) and resumed from its checkpoint continues the same run:
one run directory, one step series, its rules' decisions at the same steps as a run never interrupted,
the LR cuts in force carried over, and no command of the processes before reaching the new ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.daemon import Agent
from gradwatch.agent.settings import AgentConfig
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.reader import read_all_records
from gradwatch.spool.records import ResumeRecord, StepRecord, merge_logged
from tests.conftest import SUPPORT, http_json, wait_until

pytestmark = pytest.mark.integration

# observe mode: the decisions do not change the trajectory, so two runs can be compared step for step
WATCHING = """
rules:
  - name: val-plateau
    metric: val_loss
    detect: {type: plateau, patience: 2, threshold: 0.02, cooldown: 1}
    action: {type: reduce_lr, factor: 0.5}
    mode: observe
    max_actions: 4
  - name: val-early-stop
    metric: val_loss
    detect: {type: early_stopping, patience: 5, min_delta: 0.001}
    action: {type: stop}
    mode: observe
  - name: loss-spike
    metric: loss
    detect: {type: spike, z_threshold: 3.0, warmup: 20}
    action: {type: reduce_lr, factor: 0.9}
    mode: observe
"""


@pytest.fixture
def daemon(isolated_home: Path) -> Iterator[Agent]:
    agent = Agent(AgentConfig(home=isolated_home, port=0))
    agent.start()
    yield agent
    agent.stop()


def train(home: Path, tmp_path: Path, run: str, *args: str, rules: str = WATCHING, expect: int = 0) -> dict[str, Any]:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules)
    result = tmp_path / f"{run}-{len(list(tmp_path.glob(run + '-*.json')))}.json"
    done = subprocess.run([sys.executable, str(SUPPORT / "resume_script.py"), "--run-name", run, "--rules",
                           str(rules_file), "--checkpoint", str(tmp_path / f"{run}.pt"), "--result", str(result),
                           *args], env={**os.environ, "GRADWATCH_HOME": str(home)}, capture_output=True, timeout=180)
    assert done.returncode == expect, done.stderr.decode()[-3000:]
    return json.loads(result.read_text())


def settled(agent: Agent, run: str, status: str = "finished", steps: int = 300) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        runs = [r for r in http_json(agent.url + "/api/runs")["runs"] if r["run"] == run]
        ok = runs and runs[0]["status"] == status and runs[0]["ranks"][0]["steps"] >= steps
        return runs[0] if ok else None

    return wait_until(done, timeout=60, what=f"run {run} {status} at the agent")


def decisions(home: Path, run: str) -> list[dict[str, Any]]:
    path = SpoolLayout.events_file(SpoolLayout(home).run_dir(run))
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == "decision"]


def test_a_preempted_run_resumed_from_its_checkpoint_decides_as_a_run_never_interrupted(
        daemon: Agent, isolated_home: Path, tmp_path: Path) -> None:
    straight = train(isolated_home, tmp_path, "straight")
    settled(daemon, "straight")
    # preempted at step 170 (SIGTERM, as a scheduler does); its last checkpoint is from step 150, mid-plateau
    train(isolated_home, tmp_path, "resumed", "--preempt-at", "170", expect=-signal.SIGTERM)
    run = settled(daemon, "resumed", status="interrupted", steps=170)
    assert run["ranks"][0]["end_status"] == "interrupted"
    assert not any(a["alertname"] == "GradwatchRunCrashed" for a in run["alerts"])
    resumed = train(isolated_home, tmp_path, "resumed", "--resume")
    settled(daemon, "resumed")

    assert sorted(p.name for p in SpoolLayout(isolated_home).runs_dir.iterdir()) == ["resumed", "straight"]
    assert resumed["run"] == "resumed" and resumed["steps"] == 300
    assert resumed["losses"] == {k: v for k, v in straight["losses"].items() if int(k) > 150}  # the same training
    records = merge_logged(read_all_records(SpoolLayout.records_file(SpoolLayout(isolated_home).run_dir("resumed"), 0)))
    resume = [r for r in records if isinstance(r, ResumeRecord)]
    assert [r.step for r in resume] == [150] and resume[0].checkpoint
    after = records[records.index(resume[0]) + 1:]
    assert [r.step for r in after if isinstance(r, StepRecord)] == list(range(151, 301))  # the series goes on

    expected = [(d["rule"], d["step"], d["reason"]) for d in decisions(isolated_home, "straight")]
    assert {rule for rule, _, _ in expected} >= {"val-plateau", "val-early-stop"}  # the comparison means something
    assert any(rule == "val-plateau" and step > 150 for rule, step, _ in expected)
    made = decisions(isolated_home, "resumed")
    before = [(d["rule"], d["step"], d["reason"]) for d in made if "~" not in d["id"] and d["step"] <= 150]
    since = [(d["rule"], d["step"], d["reason"]) for d in made if d["id"].endswith("~1")]
    assert before + since == expected
    lost = [d for d in made if "~" not in d["id"] and d["step"] > 150]  # decided on steps 151..170 the first time
    assert lost, "the preempted process had decisions after its checkpoint, decided again after the resume"
