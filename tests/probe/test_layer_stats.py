"""Per-layer gradient norms and update/weight ratios (probes/layerstats.py), checked against a
direct computation on the same training steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gradwatch
from gradwatch.probes.layerstats import LayerStats
from tests.spool_records import run_records


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 1))


def _records(home: Path, kind: str) -> list[dict]:
    return [r for r in run_records(home, "layers") if r["kind"] == kind]


def test_layer_norms_and_update_ratios_match_a_direct_computation(tmp_path: Path) -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    probe = gradwatch.attach(model, optimizer, home=tmp_path, run="layers", autostart_agent=False,
                             layer_stats_every=4)
    expected = {}
    for step in range(1, 13):
        x = torch.randn(16, 6)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        named = dict(model.named_parameters())
        grad = {layer: sum(named[f"{layer}.{p}"].grad.norm() ** 2 for p in ("weight", "bias")) ** 0.5
                for layer in ("0", "2", "4")}
        before = {name: p.detach().clone() for name, p in named.items()}
        optimizer.step()
        probe.log(loss=loss)
        ratio = {}
        with torch.no_grad():
            for layer in ("0", "2", "4"):
                update = sum((named[f"{layer}.{p}"] - before[f"{layer}.{p}"]).norm() ** 2 for p in ("weight", "bias"))
                weight = sum(before[f"{layer}.{p}"].norm() ** 2 for p in ("weight", "bias"))
                ratio[layer] = (update / weight) ** 0.5
        expected[step] = (grad, ratio)
    probe.close()

    records = _records(tmp_path, "layers")
    assert [r["step"] for r in records] == [4, 8, 12]
    for record in records:
        grad, ratio = expected[record["step"]]
        assert record["layers"] == ["0", "2", "4"]
        assert record["grad_norm"] == pytest.approx([float(grad[k]) for k in ("0", "2", "4")], rel=1e-5)
        assert record["update_ratio"] == pytest.approx({k: float(v) for k, v in ratio.items()}, rel=1e-4)
    # the loss logged right after a sampled step still joins that step's record
    steps = {r["step"]: r for r in _records(tmp_path, "step")}
    assert "loss" in steps[4]["values"] and not _records(tmp_path, "log")


def test_updates_are_measured_a_few_layers_at_a_time_within_the_copy_budget() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = LayerStats(model, optimizer, every=1, update_budget_bytes=1)  # one layer per sampled step
    covered = []
    for step in range(1, 5):
        model(torch.randn(4, 6)).sum().backward()
        stats.before_step()
        optimizer.step()
        item = stats.after_step(step, 0.0)
        assert item is not None
        covered.append(item.covered)
        optimizer.zero_grad()
    assert covered == [(0,), (1,), (2,), (0,)]  # rotating through the three layers


def test_layer_stats_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADWATCH_LAYER_STATS_EVERY", "0")
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gradwatch.attach(model, optimizer, home=tmp_path, run="layers", autostart_agent=False)
    for _ in range(3):
        model(torch.randn(4, 6)).sum().backward()
        optimizer.step()
    probe.close()
    assert _records(tmp_path, "layers") == [] and len(_records(tmp_path, "step")) == 3


def test_a_bad_layer_stats_value_is_refused_at_attach(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(ValueError, match="layer_stats_every must be an integer >= 0"):
        gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), home=tmp_path, layer_stats_every=-5)


def test_a_sampled_step_builds_no_tensor_from_a_python_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, ``torch.tensor(list, device=cuda)`` copies from pageable memory: a synchronisation, three per sampled
    step before. The layer indices are made once per pattern of parameters and kept on the device."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    probe = gradwatch.attach(model, optimizer, home=tmp_path, run="layers", autostart_agent=False,
                             layer_stats_every=1)

    def step() -> None:
        loss = model(torch.randn(8, 6)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # the first sampled step makes the indices
    built: list[object] = []
    original = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a) or original(*a, **k))
    for _ in range(5):
        step()
    monkeypatch.undo()
    probe.close()
    assert built == []
    assert len(_records(tmp_path, "layers")) == 6
