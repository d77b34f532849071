"""Agent state built from records: values, counters, run states, retirement of ended runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.state import MAX_METRIC_NAMES, AgentState, RunStatus
from gradwatch.spool.proc import process_start_ticks
from tests.agent.helpers import FakeClock, SpoolBuilder

LOCAL = "this-host"


@pytest.fixture
def env(tmp_path: Path) -> tuple[SpoolBuilder, AgentState, SpoolIngestor, FakeClock]:
    spool = SpoolBuilder(tmp_path)
    state = AgentState(spike_window=60.0)
    clock = FakeClock()
    return spool, state, SpoolIngestor(spool.layout, state, clock), clock


def test_records_become_per_rank_values(env) -> None:  # type: ignore[no-untyped-def]
    spool, state, ingest, _ = env
    spool.start("r")
    spool.steps("r", 0, 1, 10, loss=0.5, batch_size=16)
    spool.append("r", 0, {"kind": "log", "step": 10, "t": 1_000_001.0, "values": {"val_loss": 0.7, "acc": 0.9}})
    assert ingest.scan_all() == 21
    s = state.rank("r", 0)
    assert s is not None
    assert (s.steps_total, s.loss, s.grad_norm, s.learning_rates) == (10, 0.5, 2.0, [0.1, 0.01])
    assert (s.step_duration, s.data_wait, s.samples_per_second, s.samples_total) == (0.1, 0.02, 160.0, 160.0)
    assert s.metrics == {"val_loss": 0.7, "acc": 0.9}  # batch_size is samples, not one more metric


def test_step_count_comes_from_the_probe_so_dropped_records_do_not_shrink_it(env) -> None:  # type: ignore[no-untyped-def]
    spool, state, ingest, _ = env
    spool.start("r")
    spool.steps("r", 0, 1, 3)
    spool.steps("r", 0, 50, 50)  # the probe dropped records of steps 4..49 (queue full)
    ingest.scan_all()
    assert state.rank("r", 0).steps_total == 50  # type: ignore[union-attr]


def test_nonfinite_values_are_counted_per_quantity(env) -> None:  # type: ignore[no-untyped-def]
    spool, state, ingest, _ = env
    spool.start("r")
    spool.steps("r", 0, 1, 20, nan_every=5)
    spool.append("r", 0, {"kind": "step", "step": 21, "t": 1_000_003.0, "grad_norm": float("inf"), "lr": [0.1]},
                 {"kind": "log", "step": 21, "t": 1_000_003.0, "values": {"acc": float("nan")}})
    ingest.scan_all()
    assert state.rank("r", 0).nonfinite == {"loss": 4, "grad_norm": 1, "metric": 1}  # type: ignore[union-attr]


def test_a_step_gradscaler_skipped_is_a_skipped_step_not_a_divergence(env) -> None:  # type: ignore[no-untyped-def]
    """fp16 runs overflow now and then while GradScaler calibrates: no non-finite count (the alerts and the
    nonfinite rule read it), one skipped step with the scale in its detail."""
    spool, state, ingest, _ = env
    spool.start("r")
    spool.steps("r", 0, 1, 3)
    spool.append("r", 0, {"kind": "step", "step": 4, "t": 1_000_003.0, "grad_norm": float("inf"), "lr": [0.1],
                          "skip": "amp", "loss_scale": 65536.0, "values": {"loss": 0.5}})
    ingest.scan_all()
    s = state.rank("r", 0)
    assert s.nonfinite.get("grad_norm", 0) == 0 and s.grad_norm == 2.0  # type: ignore[union-attr]
    assert s.actions == {"skip_step:amp": 1}  # type: ignore[union-attr]
    assert "loss scale 65536" in s.recent_actions[-1]["detail"]  # type: ignore[union-attr]
    assert s.steps_total == 4  # type: ignore[union-attr]


def test_states_running_stalled_running_finished(env) -> None:  # type: ignore[no-untyped-def]
    spool, state, ingest, clock = env
    spool.start("r", t=clock.now)
    spool.steps("r", 0, 1, 5, t0=clock.now)
    ingest.scan_all()

    def status() -> RunStatus:
        state.refresh(clock(), stall_after=30, ended_ttl=600, local_host=LOCAL)
        return state.rank("r", 0).status  # type: ignore[union-attr]

    assert status() is RunStatus.RUNNING
    clock.advance(31)
    assert status() is RunStatus.STALLED
    spool.steps("r", 0, 6, 6, t0=clock.now)
    ingest.scan_all()
    assert status() is RunStatus.RUNNING
    spool.end("r", 0, 6, t=clock.now)
    ingest.scan_all()
    assert status() is RunStatus.FINISHED


def test_an_exception_in_training_makes_the_run_crashed(env) -> None:  # type: ignore[no-untyped-def]
    spool, state, ingest, clock = env
    spool.start("r")
    spool.end("r", 0, 3, status="failed")
    ingest.scan_all()
    state.refresh(clock(), stall_after=30, ended_ttl=600, local_host=LOCAL)
    assert state.rank("r", 0).status is RunStatus.CRASHED  # type: ignore[union-attr]


def test_a_process_that_died_without_finishing_is_crashed(env) -> None:  # type: ignore[no-untyped-def]
    spool, state, ingest, clock = env
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    spool.start("dead", host=LOCAL, pid=dead.pid)
    spool.start("alive", host=LOCAL, proc_start_ticks=process_start_ticks())
    spool.start("reused-pid", host=LOCAL, proc_start_ticks=(process_start_ticks() or 0) + 1)  # same pid, other process
    spool.start("other-host", host="elsewhere", pid=dead.pid)  # cannot check another machine's pids
    # a container with host networking: this host's name, its own pids (the dead pid here is a live one there)
    spool.start("container", host=LOCAL, pid=dead.pid, pid_namespace="pid:[4026532999]")
    spool.start("dead-same-namespace", host=LOCAL, pid=dead.pid, pid_namespace=os.readlink("/proc/self/ns/pid"))
    ingest.scan_all()
    state.refresh(clock(), stall_after=30, ended_ttl=600, local_host=LOCAL)
    statuses = {run: ranks[0].status for run, ranks in state.runs.items()}
    assert statuses == {"dead": RunStatus.CRASHED, "alive": RunStatus.RUNNING, "reused-pid": RunStatus.CRASHED,
                        "other-host": RunStatus.RUNNING, "container": RunStatus.RUNNING,
                        "dead-same-namespace": RunStatus.CRASHED}


def test_ended_runs_are_retired_after_the_ttl_and_not_read_again(env) -> None:  # type: ignore[no-untyped-def]
    spool, state, ingest, clock = env
    spool.start("old")
    spool.steps("old", 0, 1, 3)
    spool.end("old", 0, 3)
    spool.start("new")
    ingest.scan_all()
    assert state.refresh(clock(), stall_after=1e9, ended_ttl=600, local_host=LOCAL) == []
    clock.advance(601)
    assert state.refresh(clock(), stall_after=1e9, ended_ttl=600, local_host=LOCAL) == ["old"]
    assert set(state.runs) == {"new"} and set(state.retired) == {"old"}
    ingest.scan_all()
    ingest.scan_all()
    assert set(state.runs) == {"new"}  # a rescan does not bring it back


def test_a_retired_run_whose_records_grow_again_is_read_afresh(env) -> None:  # type: ignore[no-untyped-def]
    """A run resumed after the agent retired it: its records are read again, the new ones counted."""
    spool, state, ingest, clock = env
    spool.start("old")
    spool.steps("old", 0, 1, 3)
    spool.end("old", 0, 3)
    ingest.scan_all()
    state.refresh(clock(), stall_after=1e9, ended_ttl=600, local_host=LOCAL)
    clock.advance(601)
    assert state.refresh(clock(), stall_after=1e9, ended_ttl=600, local_host=LOCAL) == ["old"]
    ingest.scan_all()  # measures the retired run's records
    assert "old" not in state.runs
    spool.append("old", 0, {"kind": "resume", "step": 3, "t": clock(), "checkpoint": ""})
    spool.steps("old", 0, 4, 6)
    ingest.scan_all()
    rank = state.rank("old", 0)
    assert rank is not None and rank.steps_total == 6 and rank.resumes == 1 and "old" not in state.retired
    assert rank.refresh_status(clock(), 1e9, LOCAL).value == "running"


def test_a_multi_rank_run_is_crashed_if_any_rank_crashed(env) -> None:  # type: ignore[no-untyped-def]
    from gradwatch.agent.state import run_status

    spool, state, ingest, clock = env
    for rank in range(3):
        spool.start("ddp", rank=rank, world_size=3)
    spool.end("ddp", 1, 5, status="failed")
    spool.end("ddp", 2, 5)
    ingest.scan_all()
    state.refresh(clock(), stall_after=1e9, ended_ttl=600, local_host=LOCAL)
    assert run_status(list(state.runs["ddp"].values())) is RunStatus.CRASHED
    assert [r["status"] for r in state.summary(clock())[0]["ranks"]] == ["running", "crashed", "finished"]


def test_logged_metric_names_are_capped_to_bound_cardinality(env) -> None:  # type: ignore[no-untyped-def]
    spool, state, ingest, _ = env
    spool.start("r")
    spool.append("r", 0, {"kind": "log", "step": 1, "t": 1.0, "values": {f"m{i}": 1.0 for i in range(100)}})
    ingest.scan_all()
    s = state.rank("r", 0)
    assert len(s.metrics) == MAX_METRIC_NAMES and s.metric_names_dropped == 100 - MAX_METRIC_NAMES  # type: ignore[union-attr]


def test_a_run_of_a_newer_spool_format_is_refused_and_reported(env, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    spool, state, ingest, clock = env
    spool.start("future", format_version="2.0")
    spool.start("fine")
    ingest.scan_all()
    ingest.scan_all()
    assert set(state.runs) == {"fine"}
    assert "newer than this agent understands" in state.rejected_runs["future"]
    assert [r["status"] for r in state.summary(clock())] == ["running", "rejected"]
    assert len([r for r in caplog.records if "newer than this agent" in r.getMessage()]) == 1  # reported once


def test_exported_layer_series_do_not_churn_when_layers_trade_places() -> None:
    """Fifteen layers whose norms shuffle a little between samples: plain top 10 changes members at every sample;
    the exported set keeps its members while they stay among the 20 largest, and takes a layer that really rises."""
    import random

    from gradwatch.agent.state import stable_top

    rng = random.Random(0)
    base = {f"layer{i}": 1.0 + i * 0.01 for i in range(15)}  # close together: ranks trade all the time
    current: list[str] = []
    changes = plain_changes = 0
    plain: set[str] = set()
    for _ in range(50):
        values = {name: v * rng.uniform(0.9, 1.1) for name, v in base.items()}
        chosen = stable_top(current, values)
        changes += bool(current) and set(chosen) != set(current)
        top = set(sorted(values, key=values.__getitem__, reverse=True)[:10])
        plain_changes += bool(plain) and top != plain
        current, plain = chosen, top
    assert len(current) == 10 and changes == 0 and plain_changes > 10
    outside = next(name for name in base if name not in current)
    exploding = stable_top(current, {**base, outside: 100.0})
    assert outside in exploding and len(exploding) == 10  # a layer that explodes gets in at once
    values = {**dict.fromkeys(base, 1.0), **{f"x{i}": 50.0 for i in range(20)}}
    assert set(stable_top(current, values)) == {f"x{i}" for i in range(10)}  # fallen out of the top 20: replaced
