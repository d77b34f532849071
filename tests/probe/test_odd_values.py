"""What users log that is not a plain float: numpy scalars, tensors that cannot be read, a second attach."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import gradwatch
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.state import MAX_METRIC_NAMES, AgentState
from gradwatch.spool.format import SpoolLayout
from tests.agent.helpers import FakeClock, SpoolBuilder
from tests.probe.helpers import logged, read_run, tiny_model, train_steps


def test_numpy_scalars_and_0d_arrays_are_recorded_as_numbers(isolated_home: Path) -> None:
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="np") as probe:
        train_steps(model, opt, None, steps=1)
        probe.log(f32=np.float32(0.25), f64=np.float64(0.5), i64=np.int64(3), flag=np.bool_(True),
                  mean=np.mean(np.array([1.0, 2.0])), zero_d=np.array(7.5))
    _, records = read_run(isolated_home, "np")
    [(_, values)] = logged(records)
    assert values == {"f32": 0.25, "f64": 0.5, "i64": 3.0, "flag": 1.0, "mean": 1.5, "zero_d": 7.5}


def test_a_value_that_cannot_be_read_is_left_out_alone_and_named(isolated_home: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    model, opt = tiny_model()
    with caplog.at_level(logging.WARNING, logger="gradwatch"), gradwatch.attach(model, opt, run="meta") as probe:
        for _ in range(3):
            train_steps(model, opt, None, steps=1)
            probe.log(loss=torch.tensor(1.0, device="meta"), acc=0.5)
    _, records = read_run(isolated_home, "meta")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["values"] for r in steps] == [{"acc": 0.5}] * 3  # the step and its other value are recorded
    assert [r["values_dropped"] for r in steps] == [1, 2, 3]
    warned = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(warned) == 1 and "'loss'" in warned[0]  # once, naming the value
    state = AgentState(spike_window=60.0)
    SpoolIngestor(SpoolLayout(isolated_home), state, FakeClock()).scan_all()
    assert state.rank("meta", 0).values_unreadable == 3  # type: ignore[union-attr]


def test_attaching_twice_to_one_optimizer_returns_the_probe_it_has(isolated_home: Path) -> None:
    model, opt = tiny_model()
    first = gradwatch.attach(model, opt, run="once")
    with pytest.warns(RuntimeWarning, match="already has an open probe"):
        second = gradwatch.attach(model, opt, run="twice")
    assert second is first
    train_steps(model, opt, first, steps=3)
    first.close()
    assert [p.name for p in SpoolLayout(isolated_home).runs_dir.iterdir()] == ["once"]
    _, records = read_run(isolated_home, "once")
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3]  # each step hooked once
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # closed: a new attach is a new probe, without a warning
        third = gradwatch.attach(model, opt, run="again")
    assert third is not first
    third.close()


def test_metric_names_beyond_the_cap_are_counted_and_reported_once(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    spool = SpoolBuilder(tmp_path)
    spool.start("wide")
    for step in (1, 2):
        spool.append("wide", 0, {"kind": "log", "step": step, "t": 1_000_000.0 + step,
                                 "values": {f"m{i}": float(i) for i in range(MAX_METRIC_NAMES + 6)}})
    state = AgentState(spike_window=60.0)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        SpoolIngestor(spool.layout, state, FakeClock()).scan_all()
    s = state.rank("wide", 0)
    assert s is not None and len(s.metrics) == MAX_METRIC_NAMES and s.metric_names_dropped == 12
    assert len([r for r in caplog.records if "more than 64 metric names" in r.getMessage()]) == 1
