"""Half-precision gradients and non-finite norms (issue 17, mixed precision), reproduced on CPU: fp16 tensors and
the device clip coefficient run here as they do on CUDA."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import gradwatch
from gradwatch.probes.acting import device_clip_coef
from gradwatch.probes.gradnorm import GradNormMeter, global_grad_norm
from gradwatch.probes.layerstats import _norms
from tests.probe.helpers import read_run


def _reference(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _big_fp16_grads() -> list[torch.Tensor]:
    return [torch.full((100_000,), 300.0, dtype=torch.float16), torch.full((10,), 2.0, dtype=torch.float16)]


def test_fp16_gradients_whose_norm_exceeds_the_fp16_range_have_a_finite_norm() -> None:
    grads = _big_fp16_grads()  # norm ~94,862: inf in fp16 (max 65,504)
    assert torch._foreach_norm(grads[:1], 2.0)[0].isinf()  # what the probe used to record
    norm = global_grad_norm(grads)
    assert norm is not None and norm.dtype == torch.float32
    assert math.isclose(float(norm), _reference(grads), rel_tol=1e-3)  # float32 accumulation, as clip_grad_norm_ in float32
    # mixed with float64 (no narrowing: tensor by tensor) and with float32
    for other in (torch.ones(3, dtype=torch.float64), torch.ones(3)):
        mixed = [*grads, other]
        assert math.isclose(float(global_grad_norm(mixed)), _reference(mixed), rel_tol=1e-3)  # type: ignore[arg-type]


def test_the_meter_and_layer_statistics_use_float32_for_half_gradients() -> None:
    model = torch.nn.Linear(1000, 100).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    for p in model.parameters():
        p.grad = torch.full_like(p, 300.0)
    meter = GradNormMeter(opt)
    value = meter()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    resolved = value.resolve() if hasattr(value, "resolve") else float(value)  # type: ignore[union-attr,arg-type]
    assert math.isclose(resolved, _reference(grads), rel_tol=1e-3)  # float32 accumulation, as clip_grad_norm_ in float32
    layer_norms = _norms(grads, torch.device("cpu"))
    assert torch.isfinite(layer_norms).all() and layer_norms.dtype == torch.float32


def test_an_fp16_step_with_a_large_finite_norm_is_not_skipped(isolated_home: Path) -> None:
    """A false non-finite norm made the skip guard (on by default) skip a healthy step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1000, 100).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    with gradwatch.attach(model, opt, run="fp16"):
        for _ in range(3):
            x = torch.ones(64, 1000, dtype=torch.float16)
            loss = model(x).float().sum() * 8.0  # gradients of ~512 per weight: a norm of ~160,000
            opt.zero_grad()
            loss.backward()
            opt.step()
    _, records = read_run(isolated_home, "fp16")
    steps = [r for r in records if r.get("kind") == "step"]
    assert len(steps) == 3
    for record in steps:
        assert record.get("skip") is None, record
        assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 65_504
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # it stepped


def test_the_device_clip_coefficient_is_one_for_a_non_finite_norm() -> None:
    """On CUDA a NaN norm made the clip coefficient NaN and every gradient NaN; the host path uses 1."""
    assert math.isclose(float(device_clip_coef(1.0, torch.tensor(10.0))), 1.0 / (10.0 + 1e-6), rel_tol=1e-6)
    assert float(device_clip_coef(1.0, torch.tensor(0.5))) == 1.0
    for bad in (math.nan, math.inf, -math.inf):
        coef = device_clip_coef(1.0, torch.tensor(bad))
        assert float(coef) == 1.0, bad
        grads = [torch.ones(4)]
        torch._foreach_mul_(grads, coef)
        assert torch.equal(grads[0], torch.ones(4))


def test_the_probe_removes_only_its_own_found_inf(isolated_home: Path) -> None:
    """Lightning's 16-mixed with a fused optimizer: the probe's guard runs in ``on_before_optimizer_step`` and
    sets ``found_inf``; GradScaler.step() then puts its own there and deletes it after the step. The probe's
    post-step hook used to delete GradScaler's, whose own ``del`` then raised AttributeError at step 1.
    The device path runs here on CPU tensors (on CUDA it is the path every guarded step takes)."""
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    with gradwatch.attach(model, opt, run="amp") as probe:
        actuator = probe._actuator
        assert actuator is not None
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        actuator._guard_on_device(torch.tensor(math.nan))  # a skip: found_inf set for the fused optimizer
        mine = opt.found_inf  # type: ignore[attr-defined]
        assert float(mine) == 1.0
        scalers = torch.zeros(())
        opt.found_inf = scalers  # type: ignore[attr-defined]  # GradScaler.step() sets its own
        actuator.after_step(1)
        assert opt.found_inf is scalers  # type: ignore[attr-defined]  # left to GradScaler ...
        del opt.found_inf  # type: ignore[attr-defined]  # ... which deletes it: no AttributeError

        actuator._guard_on_device(torch.tensor(math.nan))
        actuator.after_step(2)  # nobody replaced it: the probe removes what it set
        assert not hasattr(opt, "found_inf")
