"""In-memory snapshots for the rewind action (probes/snapshots.py): buffers made once and reused, a restore that
writes into the live tensors, and the state-dict path when the state's layout changed since the snapshot."""

from __future__ import annotations

import pytest
import torch

from gradwatch.probes.optimizers import OptimizerSet
from gradwatch.probes.snapshots import Snapshots


def _train(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], steps: int) -> None:
    for _ in range(steps):
        for opt in optimizers:
            opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        for opt in optimizers:
            opt.step()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))


def test_once_the_slots_are_filled_a_snapshot_allocates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, [opt], 1)
    snapshots = Snapshots(model, opt, every=1, keep=3)
    for step in range(1, 4):
        snapshots.take(step)
        _train(model, [opt], 1)
    allocated: list[object] = []
    original = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: allocated.append(a) or original(*a, **k))
    for step in range(4, 20):
        snapshots.take(step)
        _train(model, [opt], 1)
    assert allocated == [] and snapshots.steps == [17, 18, 19]  # the oldest overwritten in place


def test_a_restore_writes_the_snapshot_into_the_live_tensors() -> None:
    """No second copy of the state on the device: the parameters, the moments and the param groups stay the same
    objects (and the scheduler holding the optimizer keeps working on them)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, [opt], 2)
    snapshots = Snapshots(model, opt, every=1, keep=2)
    snapshots.take(2)
    saved_params = {name: t.clone() for name, t in model.state_dict().items()}
    first = next(iter(model.parameters()))
    saved_moment = opt.state[first]["exp_avg"].clone()
    saved_lr = opt.param_groups[0]["lr"]
    live = (first, opt.state[first]["exp_avg"], opt.param_groups[0], first.data_ptr())
    for _ in range(3):
        _train(model, [opt], 1)
        scheduler.step()
    assert opt.param_groups[0]["lr"] != saved_lr
    assert snapshots.restore(before_step=5) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved_params[name]), name
    assert (first, opt.state[first]["exp_avg"], opt.param_groups[0], first.data_ptr()) == live
    assert torch.equal(opt.state[first]["exp_avg"], saved_moment) and opt.param_groups[0]["lr"] == saved_lr
    assert float(opt.state[first]["step"]) == 2.0


def test_a_snapshot_from_before_the_optimizer_had_state_is_loaded_as_a_state_dict() -> None:
    """Taken before the first step (no moments yet): restoring it leaves the optimizer without state again."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    snapshots = Snapshots(model, opt, every=1, keep=2)
    snapshots.take(0)
    saved = {name: t.clone() for name, t in model.state_dict().items()}
    _train(model, [opt], 3)
    assert snapshots.restore(before_step=3) == 0
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not opt.state


def test_several_optimizers_are_restored_each_its_own() -> None:
    model = _model()
    body = torch.optim.SGD(list(model[0].parameters()) + list(model[1].parameters()), lr=0.1, momentum=0.9)
    head = torch.optim.Adam(model[2].parameters(), lr=1e-3)
    _train(model, [body, head], 2)
    snapshots = Snapshots(model, OptimizerSet([body, head]), every=1, keep=1)
    snapshots.take(2)
    momentum = body.state[model[0].weight]["momentum_buffer"].clone()
    moment = head.state[model[2].weight]["exp_avg_sq"].clone()
    _train(model, [body, head], 2)
    snapshots.restore(before_step=4)
    assert torch.equal(body.state[model[0].weight]["momentum_buffer"], momentum)
    assert torch.equal(head.state[model[2].weight]["exp_avg_sq"], moment)


def test_no_snapshot_before_the_step_is_a_clear_refusal() -> None:
    model = _model()
    snapshots = Snapshots(model, torch.optim.SGD(model.parameters(), lr=0.1), every=10, keep=2)
    snapshots.take(10)
    with pytest.raises(ValueError, match=r"no snapshot before step 5 \(snapshots kept: 10; every 10 steps\)"):
        snapshots.restore(before_step=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU was lent to this task)")
def test_on_a_gpu_snapshots_and_restores_allocate_no_device_memory() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=False)
            model(torch.randn(64, 1024, device="cuda")).pow(2).mean().backward()
            opt.step()

    train(2)
    snapshots = Snapshots(model, opt, every=1, keep=2)
    snapshots.take(2)
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    train(3)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    snapshots.restore(before_step=5)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # written into the live tensors, nothing new on the device
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
