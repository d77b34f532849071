"""Where a non-finite value came from (issue 18): the parameters whose gradients went non-finite at the bad step,
and the first module whose forward output did at a checked step after it. NaN planted in a known layer, in the
forward pass and in the backward pass; a single bad batch; a run that stays NaN; and a healthy run, which must
get no record and no forward hook at all."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.agent.alerts import AlertTracker
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.rules import AgentRules
from gradwatch.agent.state import AgentState
from gradwatch.rules.config import parse_rules
from gradwatch.spool.format import SpoolLayout
from tests.agent.helpers import FakeClock
from tests.spool_records import run_records

BAD_FROM = 10


class ForwardNaN(torch.nn.Module):
    """A layer whose output turns NaN once ``broken`` (a bad op, an overflow in an attention block)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y * float("nan") if self.broken else y


class _InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


class BackwardInf(torch.nn.Module):
    """A layer whose forward is fine and whose backward turns the gradient infinite once ``broken``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return _InfGradient.apply(y) if self.broken else y


def _train(home: Path, faulty: torch.nn.Module | None, steps: int = 30, bad_batch_at: int = 0,
           run: str = "nan") -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    torch.manual_seed(0)
    layer = faulty if faulty is not None else torch.nn.Linear(16, 16)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), layer, torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run=run, home=home, autostart_agent=False, flush_interval=0.005) as probe:
        for step in range(1, steps + 1):
            if faulty is not None:
                faulty.broken = step >= BAD_FROM  # type: ignore[assignment]
            x = torch.randn(4, 8)
            if step == bad_batch_at:
                x[0, 0] = float("nan")  # one bad sample in one batch
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss)
            time.sleep(0.005)  # a training step's pace: the writer reads a step before the next few are done
    return model, [r for r in run_records(home, run) if r["kind"] == "nonfinite"]


def test_nan_in_a_layers_forward_names_that_layer(tmp_path: Path) -> None:
    _, origins = _train(tmp_path, ForwardNaN())
    gradients = [o for o in origins if o["source"] == "gradients"]
    forward = [o for o in origins if o["source"] == "forward"]
    assert gradients[0]["step"] == BAD_FROM and gradients[0]["value"] == "nan"
    assert gradients[0]["count"] == 6  # the NaN loss reaches every parameter
    assert len(forward) == 1 and forward[0]["step"] > BAD_FROM
    assert (forward[0]["module"], forward[0]["value"]) == ("2", "nan")  # the planted layer, not its child 2.lin


def test_inf_in_a_layers_backward_names_it_as_nearest_the_loss_and_the_forward_as_finite(tmp_path: Path) -> None:
    _, origins = _train(tmp_path, BackwardInf())
    gradients = [o for o in origins if o["source"] == "gradients"]
    forward = [o for o in origins if o["source"] == "forward"]
    first = gradients[0]
    assert first["step"] == BAD_FROM
    assert first["params"] == ["0.weight", "0.bias", "2.lin.weight", "2.lin.bias"]  # upstream of the bad backward
    assert first["module"] == "2.lin"  # nearest the loss among them: where the backward pass met it
    assert len(forward) == 1 and forward[0]["module"] == ""  # every forward output finite: the backward's doing


def test_one_bad_batch_is_named_once_and_the_forward_check_after_it_is_clean(tmp_path: Path) -> None:
    _, origins = _train(tmp_path, None, bad_batch_at=12)
    assert (origins[0]["source"], origins[0]["step"]) == ("gradients", 12)
    assert [o["module"] for o in origins if o["source"] == "forward"] == [""]
    assert len(origins) == 2


def test_a_run_that_stays_nan_is_named_once_per_hundred_steps(tmp_path: Path) -> None:
    _, origins = _train(tmp_path, ForwardNaN(), steps=130)
    assert [o["step"] for o in origins if o["source"] == "gradients"] == [BAD_FROM, BAD_FROM + 100]
    assert len([o for o in origins if o["source"] == "forward"]) == 2


def test_a_healthy_run_gets_no_record_and_no_forward_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[object] = []
    original = torch.nn.Module.register_forward_hook
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook",
                        lambda self, *a, **k: registered.append(self) or original(self, *a, **k))
    model, origins = _train(tmp_path, None, run="healthy")
    assert origins == [] and registered == []
    assert all(not m._forward_hooks for m in model.modules())


NONFINITE_RULE = """
rules:
  - name: nan-loss
    metric: grad_norm
    detect: {type: nonfinite}
    action: {type: stop}
    mode: observe
"""


def test_the_agents_alert_and_run_summary_say_where_it_broke(tmp_path: Path) -> None:
    _train(tmp_path, ForwardNaN())
    clock = FakeClock(time.time())
    state = AgentState(spike_window=60.0, rules=AgentRules(parse_rules(NONFINITE_RULE, "rules.yaml"), None))
    SpoolIngestor(SpoolLayout(tmp_path), state, clock).scan_all()
    [run] = state.summary(clock())
    [rank] = run["ranks"]
    texts = [o["text"] for o in rank["nonfinite_origins"]]
    assert texts[0] == f"step {BAD_FROM}: gradients non-finite (nan) in 6 parameter(s), nearest the loss in `4`"
    assert any(t.endswith("first non-finite forward output in `2` (nan)") for t in texts)
    alerts = [a for a in AlertTracker(resolve_after=1e9).evaluate(state, clock()) if a.name == "GradwatchNanLoss"]
    assert alerts and "first non-finite forward output in `2` (nan)" in alerts[0].annotations["origin"]


def test_with_the_scripts_clip_the_forward_check_still_runs(tmp_path: Path) -> None:
    """The script's clip_grad_norm_ gives the norm (reused) and scales every gradient by its NaN coefficient, so
    no gradient can be named; the forward check after the bad step still names the layer."""
    torch.manual_seed(0)
    faulty = ForwardNaN()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), faulty, torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="clipped", home=tmp_path, autostart_agent=False,
                          flush_interval=0.005) as probe:
        for step in range(1, 31):
            faulty.broken = step >= BAD_FROM
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            probe.log(loss=loss)
            time.sleep(0.005)
    origins = [r for r in run_records(tmp_path, "clipped") if r["kind"] == "nonfinite"]
    assert [(o["source"], o["module"]) for o in origins] == [("forward", "1")]
