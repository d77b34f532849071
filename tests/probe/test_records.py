"""What a probe records for a real training loop: steps, norms, learning rates, timings, scalars."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import gradwatch
from gradwatch.probes.gradnorm import global_grad_norm
from gradwatch.spool.format import FORMAT_VERSION
from tests.probe.helpers import logged, read_run, tiny_model, train_steps


def test_every_step_is_recorded_with_the_scalars_logged_after_it(isolated_home: Path) -> None:
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="basic") as probe:
        losses = train_steps(model, opt, probe, steps=25)
    meta, records = read_run(isolated_home, "basic")
    steps = [r for r in records if r["kind"] == "step"]
    logs = logged(records)
    assert [r["step"] for r in steps] == list(range(1, 26))
    assert [values["loss"] for _, values in logs] == pytest.approx(losses, rel=1e-6)
    assert [step for step, _ in logs] == list(range(1, 26))  # each log() belongs to the step before it
    assert all(values["batch_size"] == 4 for _, values in logs)
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "finished" and records[-1]["step"] == 25
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert meta["run"] == "basic" and meta["rank"] == 0 and meta["world_size"] == 1
    assert meta["format_version"] == FORMAT_VERSION and meta["torch"] == torch.__version__


def test_grad_norm_is_the_global_l2_norm_before_the_update(isolated_home: Path) -> None:
    model, opt = tiny_model()
    expected = []
    opt.register_step_pre_hook(
        lambda o, a, k: expected.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item())
    )
    with gradwatch.attach(model, opt, run="norm") as probe:
        train_steps(model, opt, probe, steps=10)
    _, records = read_run(isolated_home, "norm")
    norms = [r["grad_norm"] for r in records if r["kind"] == "step"]
    assert norms == pytest.approx(expected, rel=1e-5)


def test_fused_norm_matches_torch_for_mixed_devices_and_dtypes() -> None:
    grads = [torch.randn(5, 3), torch.randn(7, dtype=torch.float64), torch.randn(2, 2).to(torch.bfloat16)]
    expected = torch.nn.utils.get_total_norm([g.double() for g in grads]).item()
    assert global_grad_norm(grads).item() == pytest.approx(expected, rel=1e-2)
    assert global_grad_norm([]) is None


@pytest.mark.parametrize("n_tensors", [3, 40])  # read one by one and combined in Python; stacked in torch
def test_the_writer_combines_cpu_norms_as_torch_does(n_tensors: int) -> None:
    from gradwatch.probes.gradnorm import NormOfNorms

    grads = [torch.randn(17) * (i + 1) for i in range(n_tensors)]
    norms = torch._foreach_norm(grads, 2.0)
    assert NormOfNorms(norms).resolve() == pytest.approx(torch.nn.utils.get_total_norm(grads).item(), rel=1e-6)
    with_inf = [*norms[:-2], torch.tensor(math.inf), torch.tensor(1.0)]
    assert NormOfNorms(with_inf).resolve() == math.inf
    with_nan = [*norms[:-2], torch.tensor(math.inf), torch.tensor(math.nan)]  # torch: nan, not hypot's inf
    assert math.isnan(NormOfNorms(with_nan).resolve())
    assert math.isnan(torch.nn.utils.get_total_norm([*grads[:-2], torch.tensor([math.inf]), torch.tensor([math.nan])]))


def test_learning_rate_of_every_param_group(isolated_home: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters(), "lr": 0.01}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with gradwatch.attach(model, opt, run="lr"):
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            sched.step()
    _, records = read_run(isolated_home, "lr")
    lrs = [r["lr"] for r in records if r["kind"] == "step"]
    assert lrs == [pytest.approx([0.1, 0.01]), pytest.approx([0.05, 0.005]), pytest.approx([0.025, 0.0025])]


def test_step_time_and_data_wait(isolated_home: Path) -> None:
    import time

    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="timing"):
        for _ in range(4):
            time.sleep(0.05)  # "loading data": between the last step and the next forward
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
    _, records = read_run(isolated_home, "timing")
    steps = [r for r in records if r["kind"] == "step"]
    assert steps[0]["dur"] is None and steps[0]["wait"] is None  # nothing to measure from yet
    for r in steps[1:]:
        assert r["wait"] >= 0.05 and r["dur"] >= r["wait"]


def test_tensor_and_python_scalars_any_name(isolated_home: Path) -> None:
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="scalars") as probe:
        probe.log(val_loss=torch.tensor(0.25), accuracy=0.9, tokens=1024, flag=True, nan=float("nan"))
    _, records = read_run(isolated_home, "scalars")
    values = logged(records)[0][1]
    assert values["val_loss"] == 0.25 and values["accuracy"] == 0.9 and values["tokens"] == 1024
    assert values["flag"] == 1.0 and math.isnan(values["nan"])


def test_non_scalar_is_ignored_with_one_warning_and_training_goes_on(isolated_home: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="bad-scalar") as probe:
        for _ in range(3):
            probe.log(loss=1.0, weights=torch.ones(3), label="text")
    _, records = read_run(isolated_home, "bad-scalar")
    assert [values for _, values in logged(records)] == [{"loss": 1.0}] * 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "gradwatch"]
    assert len([w for w in warnings if "weights" in w]) == 1 and len([w for w in warnings if "label" in w]) == 1


class _Marker:
    pass


class _HoldsMarker(torch.autograd.Function):
    """Identity whose graph node holds a marker object: the marker lives exactly as long as the graph."""

    @staticmethod
    def forward(ctx, x, marker):  # type: ignore[no-untyped-def]
        ctx.marker = marker
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad, None


def test_the_probe_keeps_no_autograd_graph_alive(isolated_home: Path) -> None:
    import gc
    import weakref

    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="graph", flush_interval=3600) as probe:
        marker = _Marker()
        ref = weakref.ref(marker)
        loss = _HoldsMarker.apply(model(torch.randn(4, 8)), marker).pow(2).mean()
        del marker
        gc.collect()
        assert ref() is not None  # held by the graph of `loss`
        probe.log(loss=loss)
        del loss
        gc.collect()
        assert ref() is None  # the queued record holds a detached value, not the graph


def test_a_run_that_raises_inside_the_context_is_marked_failed(isolated_home: Path) -> None:
    model, opt = tiny_model()
    with pytest.raises(ValueError), gradwatch.attach(model, opt, run="fails") as probe:
        train_steps(model, opt, probe, steps=2)
        raise ValueError("boom")
    _, records = read_run(isolated_home, "fails")
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "failed" and "boom" in records[-1]["error"]


def test_runs_with_the_same_name_get_distinct_directories(isolated_home: Path) -> None:
    model, opt = tiny_model()
    names = []
    for _ in range(3):
        with gradwatch.attach(model, opt, run="same") as probe:
            probe.wait_ready()
            names.append(probe.run)
    assert names == ["same", "same-2", "same-3"]


def test_attach_rejects_wrong_arguments_with_a_clear_message() -> None:
    model, opt = tiny_model()
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        gradwatch.attach(model, model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_queue must be a positive integer"):
        gradwatch.attach(model, opt, max_queue=0)


def test_norm_follows_param_groups_added_during_training(isolated_home: Path) -> None:
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(first.parameters(), lr=0.1)
    expected = []
    opt.register_step_pre_hook(lambda o, a, k: expected.append(
        torch.sqrt(sum((p.grad.double() ** 2).sum() for g in o.param_groups for p in g["params"])).item()))
    with gradwatch.attach(first, opt, run="groups"):
        for step in range(4):
            if step == 2:
                opt.add_param_group({"params": second.parameters(), "lr": 0.01})
            second(first(torch.randn(3, 4))).sum().backward()
            opt.step()
            opt.zero_grad()
    _, records = read_run(isolated_home, "groups")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["grad_norm"] for r in steps] == pytest.approx(expected, rel=1e-5)
    assert [len(r["lr"]) for r in steps] == [1, 1, 2, 2]


def test_sparse_gradients_fall_back_to_a_per_tensor_norm(isolated_home: Path) -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SGD(embedding.parameters(), lr=0.1)
    with gradwatch.attach(embedding, opt, run="sparse"):
        embedding(torch.tensor([1, 2, 2])).sum().backward()
        expected = embedding.weight.grad.coalesce().values().norm().item()
        opt.step()
    _, records = read_run(isolated_home, "sparse")
    assert records[0]["grad_norm"] == pytest.approx(expected, rel=1e-6)
