"""What the probe learns from the script's own calls, in process: a clip_grad_norm_ result reused
instead of computing the norm twice, the loss from the backward pass, step(closure)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import gradwatch
from gradwatch.probes import interceptors
from gradwatch.probes.gradnorm import GradNormMeter
from tests.probe.helpers import read_run, tiny_model

torch_clip = getattr(torch.nn.utils.clip_grad_norm_, "__wrapped__", torch.nn.utils.clip_grad_norm_)


def count_norm_kernels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = torch._foreach_norm

    def counting(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    return calls


@pytest.mark.parametrize("script_clips", [True, False])
def test_a_clip_grad_norm_result_is_reused_not_computed_again(script_clips: bool, isolated_home: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = tiny_model()
    probe = gradwatch.attach(model, opt, run="reuse", layer_stats_every=0, autostart_agent=False)
    inputs = interceptors.listen(probe)
    calls = count_norm_kernels(monkeypatch)
    expected, in_step = [], []
    try:
        for _ in range(5):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if script_clips:
                expected.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)))
            else:
                expected.append(float(torch_clip(model.parameters(), math.inf)))
            before = calls[0]
            opt.step()
            in_step.append(calls[0] - before)
    finally:
        interceptors.stop_listening(inputs)
        probe.close()
    assert in_step == ([0] * 5 if script_clips else [1] * 5)  # one norm kernel per step, never two
    _, records = read_run(isolated_home, "reuse")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["grad_norm"] for r in steps] == pytest.approx(expected, rel=1e-6)
    assert all("loss" in r["values"] for r in steps)  # from the backward pass; the script never logged it


def test_a_norm_computed_apart_and_applied_with_clip_grads_with_norm_is_the_scripts_clip(isolated_home: Path) -> None:
    """torch >= 2.6's two-part clip (get_total_norm, then clip_grads_with_norm_), as Accelerate >= 1.16 and so
    the Transformers Trainer clip: the probe records that norm and that threshold, and which steps it clipped."""
    model, opt = tiny_model()
    probe = gradwatch.attach(model, opt, run="two-part", layer_stats_every=0, autostart_agent=False)
    expected = []
    try:
        for _ in range(5):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            params = list(model.parameters())
            total = torch.nn.utils.get_total_norm([p.grad for p in params])
            torch.nn.utils.clip_grads_with_norm_(params, 0.01, total)
            expected.append(float(total))
            opt.step()
    finally:
        probe.close()
    _, records = read_run(isolated_home, "two-part")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["grad_norm"] for r in steps] == pytest.approx(expected, rel=1e-6)
    assert all(r["clip"] == 0.01 and r["clipped"] for r in steps)


def test_a_clip_over_fewer_parameters_is_not_taken_for_the_global_norm() -> None:
    model, opt = tiny_model()
    model(torch.randn(4, 8)).sum().backward()
    meter = GradNormMeter(opt)
    partial = torch_clip(list(model.parameters())[:2], math.inf)
    assert meter((partial, 2)) is not partial
    assert meter((partial, 2)).resolve() == pytest.approx(float(torch_clip(model.parameters(), math.inf)), rel=1e-6)
    assert meter((partial, 4)) is partial


def test_step_with_closure_measures_the_gradients_the_closure_computed(isolated_home: Path) -> None:
    model, opt = tiny_model()
    x = torch.randn(4, 8)
    expected = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        expected.append(float(torch_clip(model.parameters(), math.inf)))
        return loss

    with gradwatch.attach(model, opt, run="closure", layer_stats_every=0, autostart_agent=False):
        for _ in range(3):
            opt.step(closure)
    _, records = read_run(isolated_home, "closure")
    assert [r["grad_norm"] for r in records if r["kind"] == "step"] == pytest.approx(expected, rel=1e-6)


def test_several_optimizers_given_to_attach_each_have_their_own_norm_and_groups(isolated_home: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    body = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.1},
                            {"params": [model[0].bias], "lr": 0.2}])
    head = torch.optim.Adam(model[2].parameters(), lr=0.003)
    expected: list[list[float]] = []
    with gradwatch.attach(model, [body, head], run="two", layer_stats_every=0, autostart_agent=False):
        for _ in range(3):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            expected.append([float(torch_clip(model[0].parameters(), math.inf)),
                             float(torch_clip(model[2].parameters(), math.inf))])
            body.step()
            head.step()
            body.zero_grad()
            head.zero_grad()
    _, records = read_run(isolated_home, "two")
    steps = [r for r in records if r["kind"] == "step" and "opt" not in r]  # the run's steps: `body`'s
    heads = [r for r in records if r["kind"] == "step" and r.get("opt") == "1"]
    assert [r["step"] for r in steps] == [r["step"] for r in heads] == [1, 2, 3]
    assert [r["grad_norm"] for r in steps] == pytest.approx([e[0] for e in expected], rel=1e-6)
    assert [r["grad_norm"] for r in heads] == pytest.approx([e[1] for e in expected], rel=1e-6)
    assert steps[0]["lr"] == [0.1, 0.2] and heads[0]["lr"] == [0.003]


def test_a_bug_in_the_backward_wrapper_never_fails_the_backward(isolated_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: object, loss: object) -> None:
        raise RuntimeError("bug in gradwatch")

    monkeypatch.setattr(interceptors.StepInputs, "on_backward", broken)
    model, opt = tiny_model()
    probe = gradwatch.attach(model, opt, run="buggy-wrapper", layer_stats_every=0, autostart_agent=False)
    inputs = interceptors.listen(probe)
    try:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            assert all(p.grad is not None for p in model.parameters())  # torch's backward still ran
            opt.step()
    finally:
        interceptors.stop_listening(inputs)
        probe.close()
    assert probe.internal_errors == 3
    assert len([r for r in caplog.records if "bug in gradwatch" in r.getMessage()]) == 1
