"""The agent is killed in the middle of a run and restarted: totals and last values stay exact."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import metric, run_training, wait_until

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_restart_mid_run_loses_nothing_and_counts_nothing_twice(isolated_home: Path, agent_process, tmp_path: Path,
                                                                how: int) -> None:  # type: ignore[no-untyped-def]
    agent = agent_process("--stall-after", "60")
    result_file = tmp_path / "result.json"
    training = run_training(isolated_home, "--run", "restart", "--steps", "300", "--sleep", "0.02", "--nan-every", "7",
                            "--result", str(result_file), wait=False)
    wait_until(lambda: (metric(agent.metrics(), "gradwatch_steps_total", optimizer="0", run="restart", rank="0") or 0) >= 50,
               timeout=120, what="the run to get going")
    agent.stop(how)  # in the middle of the run (SIGKILL: no final checkpoint)
    wait_until(lambda: (isolated_home / "runs" / "restart" / "rank-0.records.jsonl").stat().st_size > 0, timeout=5)
    restarted = agent_process("--stall-after", "60", port=agent.port)
    _, err = training.communicate(timeout=300)
    assert training.returncode == 0, err.decode()
    truth = json.loads(result_file.read_text())

    def final() -> dict | None:  # type: ignore[type-arg]
        samples = restarted.metrics()
        state = metric(samples, "gradwatch_run_state", run="restart", rank="0", state="finished")
        return samples if state == 1.0 else None

    samples = wait_until(final, timeout=60, what="the restarted agent to see the end of the run")
    assert metric(samples, "gradwatch_steps_total", optimizer="0", run="restart", rank="0") == truth["steps"] == 300
    assert metric(samples, "gradwatch_loss", optimizer="0", run="restart", rank="0") == pytest.approx(truth["last_loss"], rel=1e-12)
    # sums over every record: a record applied twice or skipped would show here
    assert metric(samples, "gradwatch_samples_total", run="restart", rank="0") == truth["samples"]
    assert metric(samples, "gradwatch_nonfinite_total", run="restart", rank="0", quantity="metric") == truth["nans"]
