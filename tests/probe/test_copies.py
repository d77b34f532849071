"""What gradwatch puts on a model is invisible to copies and pickles: a copy is a plain model, the
original stays watched, and a compiled model copies and saves too."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import torch

import gradwatch
from tests.probe.helpers import read_run, tiny_model, train_steps


def test_a_deepcopy_is_a_plain_model_and_the_original_stays_watched(isolated_home: Path) -> None:
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="copies") as probe:
        train_steps(model, opt, probe, steps=2)
        ema = copy.deepcopy(model)
        ema(torch.randn(2, 8))  # its first forward drops the inert hook the copy inherited
        assert len(ema._forward_pre_hooks) == 0 and len(model._forward_pre_hooks) == 1
        shallow = copy.copy(model)  # shares the original's hooks: they must stay
        shallow(torch.randn(2, 8))
        assert len(model._forward_pre_hooks) == 1
        train_steps(model, opt, probe, steps=3)
        assert pickle.loads(pickle.dumps(opt)).param_groups[0]["lr"] == 0.05
    _, records = read_run(isolated_home, "copies")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(r["wait"] is not None for r in steps[1:])  # the original's forward is still timed


def test_a_saved_model_holds_no_trace_of_gradwatch(isolated_home: Path) -> None:
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="saved") as probe:
        train_steps(model, opt, probe, steps=2)
        buffer = io.BytesIO()
        torch.save(model, buffer)
    assert b"gradwatch" not in buffer.getvalue()
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))  # the saved hook passes the forward's arguments through


def test_a_compiled_model_copies_and_saves(isolated_home: Path) -> None:
    model, opt = tiny_model()
    compiled = torch.compile(model, backend="eager")
    with gradwatch.attach(model, opt, run="compiled-copies") as probe:
        train_steps(compiled, opt, probe, steps=2)
        twin = copy.deepcopy(compiled)
        buffer = io.BytesIO()
        torch.save(compiled, buffer)
        x = torch.randn(2, 8)
        assert torch.equal(twin(x), compiled(x))
    assert b"gradwatch" not in buffer.getvalue()
    _, records = read_run(isolated_home, "compiled-copies")
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2]
