"""The probe with torch features users combine it with: AMP GradScaler, torch.compile, CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from tests.probe.helpers import logged, read_run, tiny_model

_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs a CUDA device; none on this machine (no GPU was lent to this task)")


def needs_cuda(test: Any) -> Any:
    """A GPU check (``-m gpu``, scripts/gpu_checks.sh), skipped without CUDA."""
    return pytest.mark.gpu(_no_cuda(test))


def test_grad_norm_under_grad_scaler_is_of_the_unscaled_gradients(isolated_home: Path) -> None:
    model, opt = tiny_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    unscaled = []
    # Registered before attach: sees the gradients right before the update, as the probe does.
    opt.register_step_pre_hook(lambda o, a, k: unscaled.append(
        torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()))
    with gradwatch.attach(model, opt, run="amp") as probe:
        for _ in range(5):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaled = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
            scaler.step(opt)
            scaler.update()
            probe.log(loss=loss)
            assert scaled > 1000 * unscaled[-1]  # the gradients really were scaled by 2**12
    _, records = read_run(isolated_home, "amp")
    assert [r["grad_norm"] for r in records if r["kind"] == "step"] == pytest.approx(unscaled, rel=1e-5)


def test_works_on_a_compiled_model(isolated_home: Path) -> None:
    model, opt = tiny_model()
    compiled = torch.compile(model)
    with gradwatch.attach(compiled, opt, run="compiled") as probe:
        for _ in range(4):
            loss = compiled(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss)
    _, records = read_run(isolated_home, "compiled")
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 4 and all(r["grad_norm"] > 0 for r in steps)
    assert all(r["wait"] is not None for r in steps[1:])  # hooks on the compiled wrapper run eagerly


def test_does_nothing_inside_code_traced_by_torch_compile(isolated_home: Path) -> None:
    model, opt = tiny_model()
    probe = gradwatch.attach(model, opt, run="traced")

    @torch.compile(fullgraph=True, backend="eager")  # fullgraph: a graph break in the probe would raise
    def step_fn(x: torch.Tensor) -> torch.Tensor:
        loss = model(x).pow(2).mean()
        probe.log(loss=loss)
        return loss

    for _ in range(3):
        step_fn(torch.randn(4, 8))
    probe.close()
    _, records = read_run(isolated_home, "traced")
    assert [r["kind"] for r in records] == ["end"]  # nothing recorded from inside the traced code


def test_compiled_optimizer_step_is_left_alone(isolated_home: Path) -> None:
    model, opt = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    with gradwatch.attach(model, opt, run="compiled-opt") as probe:
        compiled_step = torch.compile(opt.step, backend="eager")
        for _ in range(3):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            compiled_step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))  # training really stepped
    assert probe.internal_errors == 0
    _, records = read_run(isolated_home, "compiled-opt")
    assert [r["kind"] for r in records] == ["end"]  # the hooks were traced, so they recorded nothing


@needs_cuda
@pytest.mark.parametrize("layer_stats_every", [100, 1])  # 1: every step sampled, per-layer statistics too
def test_no_host_device_sync_per_step_on_gpu(layer_stats_every: int, isolated_home: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = gradwatch.attach(model, opt, run="gpu", layer_stats_every=layer_stats_every)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(3):  # warm up allocators and kernels outside the check
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(50):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss, batch_size=32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    probe.close()
    _, records = read_run(isolated_home, "gpu")
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 53 and all(r["grad_norm"] > 0 for r in steps)
    assert [values["batch_size"] for _, values in logged(records)] == [32] * 50
    layers = [r for r in records if r["kind"] == "layers"]
    assert len(layers) == (53 if layer_stats_every == 1 else 0)


@needs_cuda
def test_grad_scaler_on_gpu_records_unscaled_norm(isolated_home: Path) -> None:
    model = torch.nn.Linear(16, 1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    unscaled = []
    opt.register_step_pre_hook(lambda o, a, k: unscaled.append(
        torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()))
    with gradwatch.attach(model, opt, run="gpu-amp"):
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(torch.randn(8, 16, device="cuda")).pow(2).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    _, records = read_run(isolated_home, "gpu-amp")
    norms = [r["grad_norm"] for r in records if r["kind"] == "step"]
    assert norms == pytest.approx(unscaled[: len(norms)], rel=1e-3)
