"""The probe stays out of CUDA graph captures (issue 17). In the default global capture mode any thread's event
query invalidates a capture, and hooks that ran while a stream captured would put the probe's copies into the
graph. No GPU here: ``torch.cuda.CUDAGraph`` and the capturing check are stand-ins (the tests say so); the GPU
test captures a real training step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.probes import graph_capture, readback
from tests.probe.helpers import tiny_model, train_steps
from tests.spool_records import run_records


class StandInGraph:
    """CUDAGraph's two methods the probe wraps (the CPU build's class cannot be instantiated)."""

    def capture_begin(self, *args: Any, **kwargs: Any) -> None:
        pass

    def capture_end(self) -> None:
        pass


@pytest.fixture
def capture(monkeypatch: pytest.MonkeyPatch) -> StandInGraph:
    monkeypatch.setattr(torch.cuda, "CUDAGraph", type("CUDAGraph", (StandInGraph,), {}))
    monkeypatch.setattr(graph_capture, "_installed", False)
    graph_capture.install()
    capturing = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    graph = torch.cuda.CUDAGraph()  # type: ignore[call-arg]
    original_begin, original_end = graph.capture_begin, graph.capture_end

    def begin() -> None:
        original_begin()
        capturing["on"] = True

    def end() -> None:
        capturing["on"] = False
        original_end()

    graph.capture_begin, graph.capture_end = begin, end  # type: ignore[method-assign]
    yield graph  # type: ignore[misc]
    assert not graph_capture.active()


def test_no_event_is_queried_while_a_capture_runs(capture: StandInGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    queried: list[bool] = []

    class Event:
        def record(self, stream: Any = None) -> None:
            pass

        def query(self) -> bool:
            queried.append(True)
            return True

    monkeypatch.setattr(readback, "pinned", lambda shape, dtype: torch.empty(shape, dtype=dtype))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    pending = readback.PendingDeviceValue(torch.tensor(3.5))
    capture.capture_begin()
    assert pending.resolve() is readback.NOT_READY and not queried
    capture.capture_end()
    assert pending.resolve() == 3.5 and queried


def test_steps_and_values_of_a_capture_are_not_recorded(capture: StandInGraph, isolated_home: Path) -> None:
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="graphs", flush_interval=0.01) as probe:
        train_steps(model, opt, probe, steps=2)
        capture.capture_begin()
        train_steps(model, opt, probe, steps=1)  # what torch.cuda.graph's body runs once, to record it
        assert probe.step == 2
        capture.capture_end()
        train_steps(model, opt, probe, steps=2)
    steps = [r for r in run_records(isolated_home, "graphs") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all("loss" in r["values"] for r in steps)


def test_without_cuda_parameters_nothing_is_wrapped(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_capture, "_installed", False)
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="cpu"):
        pass
    assert not graph_capture._installed  # a CPU run's process keeps torch's CUDAGraph as it is


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU was lent to this task)")
def test_a_whole_step_captured_in_global_mode_with_the_probe_attached(isolated_home: Path) -> None:
    """PyTorch's whole-network capture recipe (warm-up on a side stream, capture, replay), with the writer thread
    polling throughout: the capture succeeds and replays train; the eager steps before it are recorded."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    static_x, static_y = torch.randn(32, 64, device="cuda"), torch.randn(32, 1, device="cuda")
    with gradwatch.attach(model, opt, run="graphed", flush_interval=0.001) as probe:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(model(static_x), static_y)
                loss.backward()
                opt.step()
                probe.log(loss=loss)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_loss = torch.nn.functional.mse_loss(model(static_x), static_y)
            static_loss.backward()
            opt.step()
        for _ in range(20):
            static_x.copy_(torch.randn(32, 64, device="cuda"))
            graph.replay()
        torch.cuda.synchronize()
        assert probe.step == 3
    steps = [r for r in run_records(isolated_home, "graphed") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
