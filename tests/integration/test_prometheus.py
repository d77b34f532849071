"""A real training script, a real agent and a real Prometheus: PromQL sees what the script did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_training, wait_until

pytestmark = pytest.mark.integration


def test_promql_returns_the_logged_loss_and_the_steps_run(isolated_home: Path, agent_process, prometheus,
                                                          tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = agent_process()
    prom = prometheus([f"127.0.0.1:{agent.port}"])
    result_file = tmp_path / "result.json"
    run_training(isolated_home, "--run", "promql", "--steps", "120", "--sleep", "0.01", "--result", str(result_file))
    truth = json.loads(result_file.read_text())

    steps = wait_until(lambda: prom.scalar('gradwatch_steps_total{run="promql",rank="0"}') == truth["steps"],
                       timeout=60, what="Prometheus to scrape the final step count")
    assert steps
    loss = prom.scalar('gradwatch_loss{run="promql",rank="0"}')
    assert loss == pytest.approx(truth["last_loss"], rel=1e-12)
    assert prom.scalar('gradwatch_samples_total{run="promql"}') == truth["samples"]
    assert prom.scalar('gradwatch_learning_rate{run="promql",group="0"}') == pytest.approx(1e-3)
    assert prom.scalar('gradwatch_grad_norm{run="promql"}') > 0
    assert prom.scalar('gradwatch_step_duration_seconds{run="promql"}') >= 0.01
    wait_until(lambda: prom.scalar('gradwatch_run_state{run="promql",state="finished"}') == 1.0, timeout=30,
               what="finished state")
    info = prom.query('gradwatch_run_info{run="promql"}')[0]["metric"]
    assert info["world_size"] == "1" and info["host"]
    lines = (isolated_home / "runs" / "promql" / "rank-0.records.jsonl").read_text().count("\n")
    assert prom.scalar("gradwatch_agent_records_ingested_total") == lines
    assert prom.scalar('up{job="gradwatch"}') == 1.0


def test_a_spike_between_scrapes_leaves_a_trace(isolated_home: Path, agent_process, prometheus) -> None:  # type: ignore[no-untyped-def]
    """One-step spike at step 60 of a fast run: Prometheus samples every second and would miss the value."""
    from tests.agent.helpers import SpoolBuilder

    agent = agent_process()
    prom = prometheus([f"127.0.0.1:{agent.port}"])
    wait_until(lambda: prom.scalar('up{job="gradwatch"}') == 1.0, timeout=30, what="first scrape")
    import time

    spool = SpoolBuilder(isolated_home)
    now = time.time()
    spool.start("spiky", t=now)
    records = []
    for step in range(1, 101):
        loss = 50.0 if step == 60 else 1.0 + 0.01 * (step % 3)
        records += [{"kind": "step", "step": step, "t": now + step * 0.001, "grad_norm": 1.0, "lr": [0.1]},
                    {"kind": "log", "step": step, "t": now + step * 0.001, "values": {"loss": loss}}]
    spool.append("spiky", 0, *records)  # 100 steps inside one scrape interval
    wait_until(lambda: prom.scalar('gradwatch_steps_total{run="spiky"}') == 100, timeout=30, what="ingest")
    assert prom.scalar('gradwatch_loss{run="spiky"}') < 2  # the sampled value missed the spike...
    assert prom.scalar('gradwatch_spikes_total{run="spiky",quantity="loss"}') == 1  # ...the counter did not
    assert prom.scalar('gradwatch_loss_recent_max{run="spiky"}') == 50.0
