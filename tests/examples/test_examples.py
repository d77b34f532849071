"""Every example in examples/ runs under ``gradwatch run`` with a real agent, and its loss and
gradient norm show in the agent's /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import metric, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")

CASES = {
    "plain_loop": ((sys.executable,), 1),
    "torchrun_ddp": (TORCHRUN, 2),
    "lightning_train": ((sys.executable,), 1),
    "hf_trainer": ((sys.executable,), 1),
}


@pytest.mark.integration
@pytest.mark.parametrize("example", sorted(CASES))
def test_example_runs_under_gradwatch_and_shows_loss_and_grad_norm(example: str, agent_process: Any,
                                                                    isolated_home: Path) -> None:
    agent = agent_process()
    launcher, ranks = CASES[example]
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch", "run", "--run", example, "--home", str(isolated_home), "--",
         *launcher, str(EXAMPLES / f"{example}.py"), "--steps", "40"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "GRADWATCH_AUTOSTART": "0"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr

    def exported() -> Any:
        samples = agent.metrics()
        found = [(metric(samples, "gradwatch_loss", optimizer="0", run=example, rank=str(r)),
                  metric(samples, "gradwatch_grad_norm", optimizer="0", run=example, rank=str(r)),
                  metric(samples, "gradwatch_steps_total", optimizer="0", run=example, rank=str(r))) for r in range(ranks)]
        return found if all(v is not None for row in found for v in row) else None

    for loss, grad_norm, step in wait_until(exported, timeout=30, what=f"{example}'s metrics at the agent"):
        assert step == 40
        assert loss > 0 and grad_norm > 0
