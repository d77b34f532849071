"""Several ranks of a real torch.distributed (gloo) run are served by one agent as one run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradwatch.agent.daemon import Agent
from gradwatch.agent.settings import AgentConfig
from tests.conftest import free_port, http_json, wait_until

pytestmark = pytest.mark.integration
WORLD = 2
STEPS = 30


def _worker(rank: int, home: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GRADWATCH_HOME=home, GRADWATCH_AUTOSTART="0")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import gradwatch

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="ddp") as probe:
        for _ in range(STEPS):
            loss = model(torch.randn(4, 8) + rank).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss, batch_size=4)
    dist.destroy_process_group()


def test_two_ranks_one_run_one_agent(isolated_home: Path) -> None:
    agent = Agent(AgentConfig(home=isolated_home, port=0))
    agent.start()
    try:
        mp.start_processes(_worker, args=(str(isolated_home), free_port()), nprocs=WORLD, join=True,
                           start_method="spawn")

        def finished() -> dict | None:  # type: ignore[type-arg]
            runs = http_json(agent.url + "/api/runs")["runs"]
            return runs[0] if len(runs) == 1 and runs[0]["status"] == "finished" else None

        run = wait_until(finished, timeout=30, what="both ranks finished")
    finally:
        agent.stop()
    assert run["run"] == "ddp" and run["world_size"] == WORLD
    assert [(r["rank"], r["steps"]) for r in run["ranks"]] == [(0, STEPS), (1, STEPS)]
    # DDP averages gradients across ranks: both ranks see the same global gradient norm
    assert run["ranks"][0]["grad_norm"] == pytest.approx(run["ranks"][1]["grad_norm"], rel=1e-6)
    assert run["ranks"][0]["pid"] != run["ranks"][1]["pid"]


def test_a_torchrun_job_preempted_with_sigterm_is_interrupted_on_every_rank(isolated_home: Path) -> None:
    """A scheduler preempts a torchrun job: torchrun gets SIGTERM and passes it to its workers, which end as
    interrupted (no crash), each having written its end record."""
    import signal
    import subprocess
    import sys

    from tests.conftest import SUPPORT
    from tests.spool_records import run_records

    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
                             "--master-port", str(free_port()), str(SUPPORT / "rules_script.py"), "--run-name",
                             "preempted", "--steps", "100000", "--sleep", "0.02"],
                            env={**os.environ, "GRADWATCH_HOME": str(isolated_home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: all(len([r for r in run_records(isolated_home, "preempted", rank) if r["kind"] == "step"])
                               > 20 for rank in range(WORLD)), timeout=120, what="both ranks under way")
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports the preemption
    ends = [[r for r in run_records(isolated_home, "preempted", rank) if r["kind"] == "end"] for rank in range(WORLD)]
    assert [[(e["status"], e["error"]) for e in rank_ends] for rank_ends in ends] == \
        [[("interrupted", "SIGTERM")]] * WORLD
