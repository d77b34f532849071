"""A run whose ranks span two machines, each with its own spool and its own agent (two torchrun launches on
this machine, rendezvous over TCP, DDP on gloo): the agent of rank 0's machine decides, rank 0's probe hands
its commands to every rank over the training's process group, and every rank applies each one after the same
step; a slow rank delays nobody into a hang. Without GRADWATCH_RUN_ID both machines name the run alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.daemon import Agent
from gradwatch.agent.settings import AgentConfig
from gradwatch.spool.format import SpoolLayout
from tests.conftest import SUPPORT, free_port, http_json, wait_until

pytestmark = pytest.mark.integration

RULES = """
guards:
  clip: {scheme: fixed, max_norm: 5.0}
  snapshots: {every: 20, keep: 3}
rules:
  - name: cut
    metric: signal
    detect: {type: threshold, above: 0.5}
    action: {type: reduce_lr, factor: 0.5}
    mode: act
    max_actions: 1
  - name: tighten-clip
    metric: signal
    detect: {type: threshold, above: 0.5}
    action: {type: scale_clip, factor: 0.5}
    mode: act
    max_actions: 1
  - name: rewind
    metric: signal
    detect: {type: threshold, above: 0.5}
    action: {type: rewind, skip_steps: 3, min_back_steps: 10}
    mode: act
    max_actions: 1
  - name: give-up
    metric: loss
    detect: {type: early_stopping, patience: 150, min_delta: 1000}
    action: {type: stop}
    mode: act
"""


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[list[tuple[Path, Agent]]]:
    """Two "machines": a spool and an agent each."""
    out = []
    for node in range(2):
        home = tmp_path / f"node-{node}"
        agent = Agent(AgentConfig(home=home, port=0))
        agent.start()
        out.append((home, agent))
    yield out
    for _, agent in out:
        agent.stop()


def launch(machines: list[tuple[Path, Agent]], tmp_path: Path, *args: str, run: str | None = "multi",
           slow_rank: int = -1) -> list[dict[str, Any]]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    port = free_port()
    procs = []
    for node, (home, _) in enumerate(machines):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", "job-4242", str(SUPPORT / "rules_script.py"), "--rules", str(rules),
                   "--result", str(tmp_path / "rank-{rank}.json"), "--slow-rank", str(slow_rank), *args,
                   *(["--run-name", run] if run else ["--run-name", ""])]
        procs.append(subprocess.Popen(command, env={**os.environ, "GRADWATCH_HOME": str(home)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-3000:]
    return [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]


def events(home: Path, run: str) -> list[dict[str, Any]]:
    path = SpoolLayout.events_file(SpoolLayout(home).run_dir(run))
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_rank_on_every_machine_applies_each_action_after_the_same_step(
        machines: list[tuple[Path, Agent]], tmp_path: Path) -> None:
    """Rank 1 steps five times slower than rank 0 would alone (DDP makes rank 0 wait for it at each all-reduce).
    The run is not named: both machines find the same default name from torchrun's rendezvous id."""
    results = launch(machines, tmp_path, "--steps", "400", "--sleep", "0.01", "--signal-at", "60", slow_rank=1,
                     run=None)
    names = [sorted(p.name for p in SpoolLayout(home).runs_dir.iterdir()) for home, _ in machines]
    assert names[0] == names[1] and len(names[0]) == 1 and names[0][0].startswith("rules_script-")
    run = names[0][0]
    for rank, (_, agent) in enumerate(machines):
        wait_until(lambda agent=agent: [r for r in http_json(agent.url + "/api/runs")["runs"]
                                        if r["run"] == run and r["status"] == "finished"],
                   timeout=60, what=f"machine {rank}'s agent saw the run end")
    decided = [e for e in events(machines[0][0], run) if e["event"] == "decision"]
    assert {d["rule"] for d in decided} == {"cut", "tighten-clip", "rewind", "give-up"}
    assert all(d["sent"] for d in decided), "the agent of rank 0's machine sends its commands"
    assert [e for e in events(machines[1][0], run) if e["event"] == "decision"] == [], "rules read rank 0"
    acks = {rank: {e["command"]: e for e in events(home, run) if e["event"] == "ack"}
            for rank, (home, _) in enumerate(machines)}
    for decision in decided:
        here, there = acks[0][decision["id"]], acks[1][decision["id"]]
        assert here["status"] == there["status"] == "applied", (here, there)
        assert here["step"] == there["step"] > decision["step"], (decision["id"], here["step"], there["step"])
    assert here["action"] == "stop"
    assert results[0]["stopped_at"] == results[1]["stopped_at"] == acks[0][decided[-1]["id"]]["step"]
    assert results[0]["lrs"] == results[1]["lrs"] and results[0]["lrs"][-1] == pytest.approx(0.025)
    assert results[0]["params"] == results[1]["params"], "the replicas stayed identical"
    runs = {rank: http_json(agent.url + "/api/runs")["runs"][0]["ranks"][0] for rank, (_, agent) in enumerate(machines)}
    assert runs[0]["clip_threshold"] == runs[1]["clip_threshold"] == 2.5
    assert runs[0]["actions"]["skip_step:rewind"] == runs[1]["actions"]["skip_step:rewind"] == 3
