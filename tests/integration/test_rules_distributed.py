"""Actions in data-parallel training: every rank applies the same action after the same step.

A real torchrun launch of 3 processes (DDP on gloo, CPU) with the agent acting on it: a NaN
gradient on one rank (skipped by all: DDP spreads it), adaptive clipping (ZClip), a learning-
rate jump that the agent answers with a rewind and an LR cut, and a stop. No rank hangs, and
afterwards every rank holds exactly the same parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.daemon import Agent
from gradwatch.agent.settings import AgentConfig
from gradwatch.spool.format import SpoolLayout
from tests.conftest import SUPPORT, free_port, http_json, wait_until

pytestmark = pytest.mark.integration
WORLD = 3

RULES = """
guards:
  clip: {scheme: zclip, max_norm: null}
  snapshots: {every: 25, keep: 3}
rules:
  - name: rewind
    metric: loss
    detect: {type: spike, z_threshold: 6}
    action: {type: rewind, skip_steps: 5, min_back_steps: 20}
    mode: act
    max_actions: 1
  - name: cut
    metric: loss
    detect: {type: spike, z_threshold: 6}
    action: {type: reduce_lr, factor: 0.5}
    mode: act
    max_actions: 1
  - name: stop
    metric: signal
    detect: {type: threshold, above: 0.5}
    action: {type: stop}
    mode: act
"""


def test_every_rank_applies_every_action_at_the_same_step(isolated_home: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    agent = Agent(AgentConfig(home=isolated_home, port=0))
    agent.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-port",
             str(free_port()), str(SUPPORT / "rules_script.py"), "--run-name", "ddp", "--rules", str(rules),
             "--steps", "400", "--sleep", "0.02", "--nan-at", "40", "--nan-rank", "1", "--lr-jump-at", "120",
             "--lr-jump", "30", "--signal-at", "250", "--result", str(tmp_path / "rank-{rank}.json")],
            env={**os.environ, "GRADWATCH_HOME": str(isolated_home)}, capture_output=True, timeout=240)
        assert done.returncode == 0, done.stderr.decode()[-3000:]

        def finished() -> dict[str, Any] | None:
            runs = http_json(agent.url + "/api/runs")["runs"]
            return runs[0] if runs and runs[0]["status"] == "finished" else None

        run = wait_until(finished, timeout=30, what="all ranks finished")
    finally:
        agent.stop()
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(WORLD)]

    # the same end: stopped after the same step, with identical parameters and learning rates
    assert {r["stopped_at"] for r in results} == {results[0]["stopped_at"]} and results[0]["stopped_at"] >= 250
    assert all(r["params"] == results[0]["params"] for r in results), "replicas diverged"
    assert all(r["lrs"] == results[0]["lrs"] for r in results)

    events = [json.loads(line) for line in
              SpoolLayout.events_file(SpoolLayout(isolated_home).run_dir("ddp")).read_text().splitlines()]
    decisions = {e["id"]: e for e in events if e["event"] == "decision"}
    acks = [e for e in events if e["event"] == "ack"]
    assert {d["action"]["type"] for d in decisions.values()} == {"rewind", "reduce_lr", "stop"}
    for command_id, decision in decisions.items():
        mine = [a for a in acks if a["command"] == command_id]
        assert sorted(a["rank"] for a in mine) == list(range(WORLD)), f"{command_id} reached every rank"
        assert {(a["status"], a["step"]) for a in mine} == {("applied", decision["apply_at_step"])}, mine
        assert decision["apply_at_step"] > decision["step"]
    rewind_details = {a["detail"] for a in acks if a["action"] == "rewind"}
    assert len(rewind_details) == 1 and "snapshot of step" in rewind_details.pop(), "the same snapshot everywhere"

    # the guards: the NaN gradient of rank 1 was skipped by every rank, and all clipped alike
    for rank in run["ranks"]:
        assert rank["actions"]["skip_step:nonfinite"] == 1
        assert rank["actions"]["skip_step:rewind"] == 5
        assert rank["clip_threshold"] == run["ranks"][0]["clip_threshold"]
        assert rank["clipped_fraction"] == run["ranks"][0]["clipped_fraction"] > 0
