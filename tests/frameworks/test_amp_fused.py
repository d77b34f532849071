"""fp16 mixed precision with a fused optimizer, whose gradients GradScaler unscales inside ``step()`` (issue 17).
Lightning's ``16-mixed`` measures in ``on_before_optimizer_step``, where they are still scaled: the recorded norm
was the loss scale times too large (41,448 against about 0.6), and a step GradScaler skipped was recorded as a
normal one (or, with the guards hiding its gradients, made ``GradScaler.update()`` raise). Run on CPU: GradScaler
and fused Adam work there as on CUDA (autocast to float16 on CPU), with a loss scale that overflows at first."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

import gradwatch
from gradwatch.probes.lightning import GradwatchCallback
from tests.spool_records import run_records

INIT_SCALE = 2.0**24  # fp16 gradients overflow at this scale: GradScaler skips the first steps, halving it


def unscaled_norm(parameters: Any, scale: float) -> float:
    grads = [p.grad.float() for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) / scale


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        self.reference: list[tuple[float, float]] = []  # (unscaled norm, scale) seen by the script's own hook

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        scale = self.trainer.precision_plugin.scaler.get_scale()
        self.reference.append((unscaled_norm(self.parameters(), scale), scale))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


def check(records: list[dict[str, Any]], reference: list[tuple[float, float]]) -> None:
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == len(reference) == 30
    skipped = [r for r in steps if r.get("skip")]
    assert skipped and {r["skip"] for r in skipped} == {"amp"}  # GradScaler's skips, not the guards' "nonfinite"
    for record, (norm, scale) in zip(steps, reference, strict=True):
        if math.isfinite(norm):
            assert record["grad_norm"] == pytest.approx(norm, rel=1e-4)  # unscaled: about 1, not 1e6
            assert "skip" not in record
        else:
            assert record["skip"] == "amp" and record["loss_scale"] == scale
    assert steps[-1]["grad_norm"] < 100


def test_lightning_16_mixed_with_a_fused_optimizer_records_the_unscaled_norm(isolated_home: Path) -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(960, 16), torch.randn(960, 1))
    model = Regressor()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    trainer = pl.Trainer(accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], max_steps=30,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[GradwatchCallback(run="l16")])
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=32))
    check(run_records(isolated_home, "l16"), model.reference)


@pytest.mark.parametrize("guards", ["default", "clip"])
def test_a_plain_amp_loop_with_a_fused_optimizer_records_unscaled_norms_and_scaler_skips(
        guards: str, isolated_home: Path) -> None:
    """The GradScaler recipe from torch's AMP examples, with ``fused=True``; with a clipping guard as well (the
    guards run on GradScaler's scaled gradients, and leave non-finite steps to it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    rules = {"guards": {"clip": {"scheme": "fixed", "max_norm": 1e6}}} if guards == "clip" else None
    reference = []
    with gradwatch.attach(model, opt, run="amp", rules=rules) as probe:
        for _ in range(30):
            x, y = torch.randn(32, 16), torch.randn(32, 1)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            reference.append((unscaled_norm(model.parameters(), scaler.get_scale()), scaler.get_scale()))
            scaler.step(opt)
            scaler.update()
            probe.log(loss=loss)
    records = run_records(isolated_home, "amp")
    check(records, reference)
    if guards == "clip":
        assert all(r["clip"] == 1e6 for r in records if r["kind"] == "step" and not r.get("skip"))
