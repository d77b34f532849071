"""The catalogue (SageMaker Debugger's rules, live): each rule fires on a real training run with its fault planted
where users meet it, at the expected step and naming the right layer; healthy runs at PyTorch's defaults fire
none of them. The runs are recorded by the probe and read by the agent's own ingest and rules engine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.agent.alerts import AlertTracker
from gradwatch.agent.collector import AgentCollector
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.rules import AgentRules
from gradwatch.agent.state import AgentState
from gradwatch.errors import ConfigError
from gradwatch.rules.config import parse_rules
from gradwatch.rules.engine import Decision
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.records import ActivationsRecord, LayersRecord
from tests.agent.helpers import FakeClock
from tests.probe.test_nonfinite_origin import ForwardNaN

CATALOGUE = """
rules:
  - {name: vanishing_gradient, detect: {type: vanishing_gradient}}
  - {name: exploding_tensor, detect: {type: exploding_tensor}, alert: critical}
  - {name: weight_update_ratio, detect: {type: weight_update_ratio}}
  - {name: all_zero, detect: {type: all_zero}}
  - {name: input_bound, detect: {type: input_bound}}
  - {name: loss_not_decreasing, detect: {type: loss_not_decreasing}}
  - {name: overfit, detect: {type: overfit}}
  - {name: overtraining, detect: {type: overtraining}}
  - {name: unchanged_tensor, detect: {type: unchanged_tensor}}
  - {name: gpu_memory_increase, detect: {type: gpu_memory_increase}}
  - {name: step_outlier, detect: {type: step_outlier}}
  - {name: dead_relu, detect: {type: dead_relu}}
  - {name: saturated_activation, detect: {type: saturated_activation}}
  - {name: poor_weight_initialization, detect: {type: poor_weight_initialization}}
"""
EVERY = 10  # layer statistics every 10 steps: the tests' sampling cadence


def _firings(home: Path, rules: str = CATALOGUE) -> tuple[list[Decision], AgentState]:
    state = AgentState(spike_window=60.0, rules=AgentRules(parse_rules(rules, "catalogue.yaml"), None))
    ingestor = SpoolIngestor(SpoolLayout(home), state, FakeClock(time.time()))
    ingestor.scan_all()
    return [d for d in ingestor.take_outbox() if isinstance(d, Decision)], state


def _train(home: Path, model: torch.nn.Module, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *,
           steps: int, loss_fn: Callable[..., torch.Tensor] = torch.nn.functional.mse_loss,
           optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, before_step: Any = None,
           evaluate_every: int = 0, run: str = "r", **attach: Any) -> None:
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run=run, home=home, autostart_agent=False, layer_stats_every=EVERY,
                          **attach) as probe:
        for step in range(1, steps + 1):
            if before_step is not None:
                before_step(step)
            x, y = batch(step)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            probe.log(loss=loss)
            if evaluate_every and step % evaluate_every == 0:
                with torch.no_grad():
                    model.eval()
                    x, y = batch(-step)
                    probe.log(val_loss=loss_fn(model(x), y))
                    model.train()


def _regression(width: int = 16) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    teacher = torch.randn(width, 1)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, width)
        return x, torch.tanh(x @ teacher)
    return batch


def _by_rule(decisions: list[Decision]) -> dict[str, list[Decision]]:
    out: dict[str, list[Decision]] = {}
    for d in decisions:
        out.setdefault(d.rule, []).append(d)
    return out


# -- each rule on its planted fault ----------------------------------------------------------------------
def test_vanishing_gradient_in_a_20_layer_sigmoid_mlp(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(20):
        layers += [torch.nn.Linear(16, 16), torch.nn.Sigmoid()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 1))
    _train(tmp_path, model, _regression(), steps=30)
    fired = _by_rule(_firings(tmp_path)[0])
    [first] = fired["vanishing_gradient"][:1]
    assert first.step == EVERY and first.details["layer"] == "0"  # the input end, at the first sample
    assert first.details["value"] < 1e-7
    assert first.details["evidence"].startswith("vanishing_gradient at step 10: the mean |gradient| of `0` is ")
    assert "try residual connections" in first.details["evidence"]
    # the same layers barely move: weight_update_ratio's small bound and unchanged_tensor say so too, and
    # nothing else fires
    assert set(fired) == {"vanishing_gradient", "weight_update_ratio", "unchanged_tensor"}
    assert "below small_threshold" in fired["weight_update_ratio"][0].details["evidence"]


def test_all_zero_gradients_of_a_layer_whose_relus_never_fire(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 1))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # layer 2's ReLUs never fire: no gradient reaches layers 0 and 2
    _train(tmp_path, model, _regression(), steps=40)
    fired = _by_rule(_firings(tmp_path)[0])
    [zero] = fired["all_zero"]
    assert zero.step == 2 * EVERY and zero.details["layer"] in {"0", "2"}  # the second sample in a row
    assert set(zero.details["layers"]) == {"0", "2"}
    assert "100 % of `" in zero.details["evidence"] and "exactly zero" in zero.details["evidence"]


def test_a_layer_cut_off_by_a_detach_has_all_zero_gradients(tmp_path: Path) -> None:
    """Frozen by mistake: the first layer's output is detached, so no gradient reaches it though it requires
    one (a frozen layer, requires_grad off, is not judged: the next test)."""
    torch.manual_seed(0)
    first, rest = torch.nn.Linear(16, 32), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(32, 1))

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = first, rest

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x).detach())  # meant for a logging copy, left in by mistake
    _train(tmp_path, Model(), _regression(), steps=40)
    fired = _by_rule(_firings(tmp_path)[0])
    [zero] = fired["all_zero"]
    assert zero.step == 2 * EVERY and zero.details["layers"] == ["encoder"]
    assert set(fired) == {"all_zero"}  # not a vanishing gradient: an absent one


def test_a_layer_frozen_on_purpose_is_no_fault(tmp_path: Path) -> None:
    """Fine-tuning: the first layer's parameters stay in the optimizer with requires_grad off. It has no
    gradients to judge (the sample says so: no figure), so no rule names it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model[0].requires_grad_(False)
    _train(tmp_path, model, _regression(), steps=60, optimizer=opt)
    sample = gradwatch.read_run("r", tmp_path).rank(0).layers[-1]
    assert sample.grad_abs_mean[0] is None and sample.grad_zero_fraction[0] is None and "0" not in sample.update_ratio
    assert _firings(tmp_path)[0] == []


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_dead_relu_behind_a_large_negative_bias_in_an_mlp_and_a_cnn(tmp_path: Path) -> None:
    """The first ReLU's inputs are all negative from step 1 (its Linear's bias at -5; its Conv2d's at -20): the
    rule fires at the first activation sample, step 1, naming the ReLU and the layer that feeds it; the ReLUs
    downstream are alive."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 1))
    with torch.no_grad():
        mlp[0].bias.fill_(-5.0)
    _train(tmp_path / "mlp", mlp, _regression(), steps=30)
    [dead] = _by_rule(_firings(tmp_path / "mlp")[0])["dead_relu"]
    assert (dead.step, dead.details["layer"], dead.details["feeder"], dead.details["value"]) == (1, "1", "0", 100.0)
    # the ReLU after it sees only its Linear's bias: the units with a negative one are dead too
    assert dead.details["evidence"].startswith(
        "dead_relu at step 1: 100 % of `1`'s 32 units active in < 1 % of samples (threshold_layer 50 %)")
    assert dead.details["evidence"].endswith(
        "try a lower learning rate, LeakyReLU or GELU, or check the initialisation (and the bias) of `0`")

    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 64, 1))
    with torch.no_grad():
        cnn[1].bias.fill_(-20.0)  # BatchNorm's shift: every channel's input far below zero
    _train(tmp_path / "cnn", cnn, lambda step: (torch.randn(8, 3, 8, 8), torch.randn(8, 1)), steps=20)
    dead = _by_rule(_firings(tmp_path / "cnn")[0])["dead_relu"][0]  # (the ReLU after it may die too)
    # a unit is a channel: the feeder is the convolution (BatchNorm has no weight matrix)
    assert (dead.step, dead.details["layer"], dead.details["feeder"]) == (1, "2", "0")
    assert "of `2`'s 8 units active" in dead.details["evidence"]


def test_gradwatch_status_says_the_diagnosis_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no agent running, `gradwatch status` replays the spool with the shipped defaults, which include the
    catalogue: the dead ReLU's evidence is printed under the table."""
    from gradwatch.cli import main

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        mlp[0].bias.fill_(-5.0)
    _train(tmp_path, mlp, _regression(), steps=30)
    main(["status", "--home", str(tmp_path)])
    out = " ".join(capsys.readouterr().out.split())
    assert "diagnosis(es)" in out
    assert ("r: dead_relu at step 1: 100 % of `1`'s 32 units active in < 1 % of samples (threshold_layer 50 %); try "
            "a lower learning rate, LeakyReLU or GELU, or check the initialisation (and the bias) of `0`") in out


def test_saturated_tanh_with_its_inputs_scaled_100x(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), _Scale(100.0), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    _train(tmp_path, model, _regression(), steps=30)
    [saturated] = _by_rule(_firings(tmp_path)[0])["saturated_activation"]
    assert (saturated.step, saturated.details["layer"], saturated.details["feeder"]) == (1, "2", "0")
    assert saturated.details["evidence"].startswith(
        "saturated_activation at step 1: 100 % of `2`'s 32 units (tanh) have inputs outside [-9.4999, 9.4999] in "
        "over 1 % of samples")


def test_poor_weight_initialization_of_one_layer_times_100(tmp_path: Path) -> None:
    """Layer 4's weights x100: its ReLU's input variance jumps 10^4 / 6 times over the ReLU's before it (PyTorch's
    default initialisation shrinks it about 6x a layer): fires at step 1 naming that ReLU and layer 4."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(32, 32), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 1))
    with torch.no_grad():
        model[4].weight.mul_(100.0)
    _train(tmp_path, model, _regression(32), steps=20)
    [poor] = _by_rule(_firings(tmp_path)[0])["poor_weight_initialization"]
    assert (poor.step, poor.details["layer"], poor.details["feeder"]) == (1, "5", "4")
    assert poor.details["value"] > 1000
    assert "the input variance of `5` is" in poor.details["evidence"] and "that of `3` before it" in \
        poor.details["evidence"]


def test_a_deep_mlp_at_pytorchs_default_initialisation_is_no_poor_initialisation(tmp_path: Path) -> None:
    """12 Linear+ReLU layers, then 8 Linear+Tanh, at the defaults: the variance shrinks about 6x a ReLU layer
    (to the variance of the biases, 1/192), never jumps between neighbours: no poor initialisation, no
    saturation. (Its deep ReLUs see mostly their biases: dead_relu may rightly say so.)"""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for k in range(20):
        layers += [torch.nn.Linear(64 if k else 16, 64), torch.nn.ReLU() if k < 12 else torch.nn.Tanh()]
    _train(tmp_path, torch.nn.Sequential(*layers, torch.nn.Linear(64, 1)), _regression(), steps=50)
    fired = _by_rule(_firings(tmp_path)[0])
    assert not {"poor_weight_initialization", "saturated_activation"} & set(fired), fired
    variances = [v for r in gradwatch.read_run("r", tmp_path).rank(0).records if isinstance(r, ActivationsRecord)
                 for v in r.input_var[:12] if r.step == 1]
    assert max(variances) / min(variances) > 10  # smdebug's literal max/min test would have fired (70x here)


def test_weight_update_ratio_too_large_and_too_small(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.01},
                           {"params": model[2].parameters(), "lr": 0.0},  # frozen by mistake: LR 0
                           {"params": model[4].parameters(), "lr": 0.01}])

    def blow_up(step: int) -> None:  # for one update, a learning rate 10 million times too high for the head
        opt.param_groups[2]["lr"] = 1e5 if step == 30 else 0.01
    _train(tmp_path, model, _regression(), steps=40, optimizer=opt, before_step=blow_up)
    fired = _by_rule(_firings(tmp_path)[0])
    ratios = fired["weight_update_ratio"]
    small, large = ratios[0], ratios[1]
    assert small.step == EVERY and small.details["layer"] == "2" and small.details["value"] == 0.0
    assert "below small_threshold 1e-08" in small.details["evidence"]
    assert large.step == 30 and large.details["layer"] == "4" and large.details["value"] > 10
    # the LR-0 group's weights never move: unchanged_tensor at its third sample, while the run's LR is 0.01
    [unchanged] = fired["unchanged_tensor"][:1]
    assert unchanged.step == 3 * EVERY and unchanged.details["layer"] == "2"
    assert "have not changed at its last 3 samples" in unchanged.details["evidence"]
    assert "frozen by mistake?" in unchanged.details["evidence"]
    assert "above large_threshold 10" in large.details["evidence"]


def test_exploding_tensor_names_the_step_and_its_alert_the_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    faulty = ForwardNaN()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), faulty, torch.nn.Linear(16, 1))

    def break_at(step: int) -> None:
        faulty.broken = step >= 17  # broken for good from step 17: the forward check after it finds the layer
        time.sleep(0.005)  # a training step's pace: the writer reads a step before the next few are done
    _train(tmp_path, model, _regression(8), steps=40, before_step=break_at, flush_interval=0.005)
    decisions, state = _firings(tmp_path)
    [exploded] = _by_rule(decisions)["exploding_tensor"]
    assert exploded.step == 17 and exploded.reason == "nonfinite"
    assert exploded.details["evidence"].startswith("exploding_tensor at step 17: the loss is NaN")
    [alert] = [a for a in AlertTracker(resolve_after=1e9).evaluate(state, time.time())
               if a.name == "GradwatchExplodingTensor"]
    assert alert.labels["severity"] == "critical" and alert.annotations["summary"].startswith(
        "Run r: exploding_tensor at step 17")
    assert "first non-finite forward output in `1`" in alert.annotations["origin"]  # the planted layer
    scrape = AgentCollector(state, time.time).exposition().decode()
    assert 'gradwatch_rule_fired_total{rank="0",rule="exploding_tensor",run="r"} 1.0' in scrape.splitlines()


@pytest.mark.timing  # a share of step time: a loaded machine stretches the compute part
def test_input_bound_when_the_loader_sleeps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    regression = _regression()

    def slow(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.03)  # the data loader's time, before the forward pass: far more than the step's compute
        return regression(step)
    _train(tmp_path, model, slow, steps=130)
    [bound] = _by_rule(_firings(tmp_path)[0])["input_bound"]
    assert bound.step == 101  # a full window of 100 steps with a duration (the first step has none)
    assert bound.details["value"] > 50 and "waited for data" in bound.details["evidence"]


STEP_RULES = """
rules:
  - {name: step_outlier, detect: {type: step_outlier}}
"""


def _slowed_steps(steps: int, share: float, seed: int, first: int = 60) -> list[int]:
    import random
    draw = random.Random(seed)
    return [step for step in range(first, steps + 1) if draw.random() < share]


def _expected_outlier_firing(slowed: list[int], n: int = 10, window: int = 500) -> int:
    """The step at which ``n`` of the slowed steps first fall within the last ``window`` steps."""
    return next(s for k, s in enumerate(slowed) if k + 1 >= n and slowed[k + 1 - n] > s - window)


def _sleeping_train(home: Path, steps: int, slowed: set[int], *, checkpoint_every: int = 0, width: int = 64,
                    slow: float = 0.020) -> None:
    """A loop whose step is mostly a 4 ms wait (what a GPU step costs the host), ``slow`` on the ``slowed`` steps;
    every ``checkpoint_every`` steps it saves a real checkpoint of the model and its AdamW state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(slow if step in slowed else 0.004)
        return torch.randn(8, width), torch.randn(8, 1)

    def checkpoint(step: int) -> None:
        if checkpoint_every and step > 1 and (step - 1) % checkpoint_every == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, home / "last.ckpt")
    home.mkdir(parents=True, exist_ok=True)
    _train(home, model, batch, steps=steps, optimizer=opt, before_step=checkpoint)


@pytest.mark.timing
def test_step_outlier_when_steps_are_slowed_5x_at_random(tmp_path: Path) -> None:
    """About 2 % of the steps take 5x as long (a noisy neighbour): the rule fires when 10 of them fall within
    500 steps, at that step (or a slowed step or two sooner: the machine's own hiccups can count too)."""
    slowed = _slowed_steps(800, 0.02, seed=0)
    _sleeping_train(tmp_path, 800, set(slowed))
    [fired] = _by_rule(_firings(tmp_path, STEP_RULES)[0])["step_outlier"]
    expected = _expected_outlier_firing(slowed)
    assert fired.step in slowed[slowed.index(expected) - 2:slowed.index(expected) + 1], (fired.step, expected)
    assert fired.reason == "step_outlier" and fired.details["outliers"] >= 10
    assert fired.details["evidence"].startswith(f"step_outlier at step {fired.step}: ")
    assert "median" in fired.details["evidence"]


@pytest.mark.timing
def test_a_checkpoint_every_50_steps_is_periodic_news_not_outliers(tmp_path: Path) -> None:
    """A real checkpoint every 50 steps makes the next step slow on a period: reported once, at info level, and
    no step_outlier; random slow steps on top of it are still outliers."""
    _sleeping_train(tmp_path / "a", 500, set(), checkpoint_every=50, width=2048)  # 4M parameters, 50 MB
    decisions, state = _firings(tmp_path / "a", STEP_RULES)
    durations = {s.step: round(s.dur * 1e3) for s in gradwatch.read_run("r", tmp_path / "a").rank(0).steps if s.dur}
    [periodic] = _by_rule(decisions).get("step_outlier", [None])  # type: ignore[list-item]
    assert periodic is not None, [durations.get(k) for k in range(51, 501, 50)]
    assert periodic.reason == "step_outlier_periodic" and periodic.details["period"] == 50
    assert periodic.details["evidence"].startswith(f"step_outlier at step {periodic.step}: every 50 steps a step")
    [alert] = AlertTracker(resolve_after=1e9).evaluate(state, periodic.t + 1)
    assert alert.labels["severity"] == "info"

    slowed = _slowed_steps(600, 0.04, seed=5)
    _sleeping_train(tmp_path / "b", 600, set(slowed), checkpoint_every=50, width=2048, slow=0.15)  # ~5x a step
    reasons = [d.reason for d in _by_rule(_firings(tmp_path / "b", STEP_RULES)[0])["step_outlier"]]
    assert sorted(reasons) == ["step_outlier", "step_outlier_periodic"]  # (which first: the run's luck)


def test_step_outlier_at_exactly_the_limit_and_its_state_across_a_restart() -> None:
    """Steps of 10 ms (+-1 ms): the limit is the largest of median + 3 robust sigma, 2x the median and the
    median + 5 ms, i.e. exactly 20 ms here; 20 ms is no outlier, the next float past it is one. The detector's
    state round-trips through JSON (the agent's checkpoint) and decides the same afterwards."""
    import json

    from gradwatch.rules.detector_base import StepObservation
    detector = _detector("{type: step_outlier, n_outliers: 2, window: 100}")
    durations = [0.009, 0.010, 0.011] * 20
    for step, d in enumerate(durations, start=1):
        assert detector.observe(StepObservation(step, float(step), {"step_duration_seconds": d})) is None
    assert detector._limit(0.010) == 0.020
    step = len(durations)
    assert detector.observe(StepObservation(step + 1, 0.0, {"step_duration_seconds": 0.020})) is None
    assert detector.observe(StepObservation(step + 2, 0.0, {"step_duration_seconds": math.nextafter(0.020, 1)})) \
        is None  # the first outlier: n_outliers is 2
    restored = _detector("{type: step_outlier, n_outliers: 2, window: 100}")
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    for d in (detector, restored):
        trigger = d.observe(StepObservation(step + 3, 0.0, {"step_duration_seconds": 0.05}))
        assert trigger is not None and trigger.details["outliers"] == 2


def test_loss_not_decreasing_when_the_optimizer_has_the_wrong_parameters(tmp_path: Path) -> None:
    """The classic: an optimizer built over another model's parameters. The loss stays where it started; the
    rule compares the mean of steps 1001-1100 with that of steps 1-100 (10 intervals of 100 earlier)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    stale_copy = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    _train(tmp_path, model, _regression(), steps=1150, optimizer=torch.optim.SGD(stale_copy.parameters(), lr=0.1))
    [stuck] = _by_rule(_firings(tmp_path)[0])["loss_not_decreasing"]
    assert stuck.step == 1101 and "the mean loss of steps 1001-1100 is" in stuck.details["evidence"]
    assert "not 0.1 % below steps 1-100's" in stuck.details["evidence"]


def _memorise(tmp_path: Path, *, lr_zero_after: int = 0, steps: int = 400) -> list[Decision]:
    """A big MLP on 16 training samples, a validation batch of fresh ones every 20 steps: it memorises."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 1))
    teacher = torch.randn(16, 1)
    train_x = torch.randn(16, 16)
    train_y = torch.tanh(train_x @ teacher) + 0.3 * torch.randn(16, 1)  # noisy labels: memorising them hurts
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step > 0:
            return train_x, train_y
        x = torch.randn(256, 16)
        return x, torch.tanh(x @ teacher)

    def freeze(step: int) -> None:
        if lr_zero_after and step > lr_zero_after:
            opt.param_groups[0]["lr"] = 0.0
    _train(tmp_path, model, batch, steps=steps, optimizer=opt, evaluate_every=20, before_step=freeze)
    return _firings(tmp_path)[0]


def test_overfit_on_a_tiny_training_set(tmp_path: Path) -> None:
    overfit = _by_rule(_memorise(tmp_path))["overfit"][0]  # and again at each new stretch of a growing gap
    assert overfit.step % 20 == 0 and overfit.details["value"] > 0.1
    assert overfit.details["val_loss"] > overfit.details["train_loss"]
    assert "the gap growing while the training loss falls" in overfit.details["evidence"]


def test_overfit_under_lightning(tmp_path: Path) -> None:
    """The same fault in a Lightning script (tests/support/user_scripts/lightning_overfit.py): its train_loss and
    val_loss, logged with self.log and recorded by the callback, give the overfit firing at a validation step."""
    from tests.frameworks.helpers import run_script

    run_script("user_scripts/lightning_overfit.py", tmp_path)
    overfit = _by_rule(_firings(tmp_path)[0])["overfit"][0]
    assert overfit.run == "overfit" and overfit.step % 20 == 0 and overfit.details["value"] > 0.1
    assert overfit.details["val_loss"] > overfit.details["train_loss"]
    assert "the gap growing while the training loss falls" in overfit.details["evidence"]


def test_overtraining_once_neither_loss_improves(tmp_path: Path) -> None:
    """Learning stops at step 300 (LR 0): 5 training intervals and 10 validations later, the rule fires."""
    fired = _by_rule(_memorise(tmp_path, lr_zero_after=300, steps=1000))
    [over] = fired["overtraining"]
    # the last better interval is 301-400 (the loss stays at its final value there); 5 stale ones end at 900
    assert over.step == 901 and "has not improved by 1 % for 5 intervals" in over.details["evidence"]


def _allocator_run(home: Path, reserved_mib: Callable[[int], float], readings: int = 40) -> list[Decision]:
    """A run's records with the CUDA allocator's counters as the probe writes them (a reading every 10 steps,
    about once a second): no GPU here, so the counters are made up, the records and the agent are real."""
    from gradwatch.spool.records import CudaMemory, StepRecord
    from tests.agent.helpers import SpoolBuilder

    spool = SpoolBuilder(home)
    spool.start("r")
    records = []
    for step in range(1, 10 * readings + 1):
        memory = CudaMemory(allocated=1.0, reserved=reserved_mib(step // 10) * 2**20, peak=1.0, total=2**30) \
            if step % 10 == 0 else None
        records.append(StepRecord(step=step, t=1e6 + step / 10, grad_norm=1.0, lr=[0.1], dur=0.1, wait=0.01,
                                  values={"loss": 1.0}, cuda_mem=memory))
    spool.append("r", 0, *records)
    return _firings(home)[0]


def test_gpu_memory_increase_names_the_step_the_device_fills_up(tmp_path: Path) -> None:
    """A leak: 2 MiB more reserved at every reading from 100 MiB (a loss kept in a list each step)."""
    [leak] = _by_rule(_allocator_run(tmp_path, lambda k: 100 + 2 * k))["gpu_memory_increase"]
    # 11 readings (10 rises): 102 -> 122 MiB, +19.6 %; at 0.2 MiB a step the 902 MiB left are gone 4,510 steps on
    assert leak.step == 110 and "grew at each of the last 10 readings" in leak.details["evidence"]
    assert "are full at about step 4620" in leak.details["evidence"]


def test_gpu_memory_that_grows_then_stays_is_no_leak(tmp_path: Path) -> None:
    """A healthy run: the allocator reserves in its first steps (and once more when a longer batch comes), then
    stays flat."""
    assert _allocator_run(tmp_path / "warm-up", lambda k: min(100 + 50 * k, 400)) == []
    assert _allocator_run(tmp_path / "step", lambda k: 400 if k < 20 else 600) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU was lent to this task)")
def test_gpu_memory_increase_on_a_real_leak(tmp_path: Path) -> None:
    """On a GPU: a loop that keeps every step's output tensor (the classic `losses.append(loss)` with the graph)
    grows the allocator's reserve; the rule fires within the run."""
    model = torch.nn.Linear(1024, 1024).cuda()
    kept = []

    def leak(step: int) -> None:
        kept.append(torch.randn(4 * 2**20, device="cuda"))  # 16 MiB a step, never freed
        time.sleep(0.05)
    _train(tmp_path, model, lambda step: (torch.randn(64, 1024, device="cuda"),) * 2, steps=400, before_step=leak,
           optimizer=torch.optim.SGD(model.parameters(), lr=1e-3))
    assert "gpu_memory_increase" in _by_rule(_firings(tmp_path)[0])


# -- quiet on healthy runs ------------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, 4, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 32, width: int = 32, length: int = 16) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Parameter(torch.zeros(1, length, width))  # zero-initialised, as ViT's are
        self.blocks = torch.nn.Sequential(_Block(width), _Block(width))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.tokens(x) + self.positions))).transpose(1, 2)


def _healthy_runs() -> dict[str, tuple[torch.nn.Module, Callable[[int], Any], Callable[..., torch.Tensor], int]]:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 1))
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4))
    teacher = torch.nn.Conv2d(3, 4, 8)

    def images(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(32, 3, 8, 8)
        with torch.no_grad():
            return x, teacher(x).flatten(1).argmax(1)
    pattern = torch.randint(0, 32, (64,))

    def tokens(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, 64 - 17, (16,))
        seq = torch.stack([pattern[s:s + 17] for s in starts])
        return seq[:, :16], seq[:, 1:]
    return {"mlp": (mlp, _regression(), torch.nn.functional.mse_loss, 0),
            "cnn": (cnn, images, torch.nn.functional.cross_entropy, 0),
            "transformer": (_TinyTransformer(), tokens, torch.nn.functional.cross_entropy, 50)}


@pytest.mark.timing  # step_outlier is among them: alone on the machine (scripts/test.sh)
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_healthy_runs_fire_no_catalogue_rule(tmp_path: Path, kind: str) -> None:
    """2,000 steps at PyTorch's default initialisation, AdamW with a cosine schedule (the transformer with an
    evaluation every 50 steps): none of the catalogue's rules fires at its defaults."""
    model, batch, loss_fn, evaluate_every = _healthy_runs()[kind]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = 2000
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    _train(tmp_path, model, batch, steps=steps, loss_fn=loss_fn, optimizer=opt, scheduler=schedule,
           evaluate_every=evaluate_every)
    decisions, _ = _firings(tmp_path)
    # (a slow in-loop evaluation is reported once as periodic, at info: news about the loop, not a firing)
    assert [(d.rule, d.step, d.details.get("evidence")) for d in decisions if d.reason != "step_outlier_periodic"] \
        == []
    losses = [s.values["loss"] for s in gradwatch.read_run("r", tmp_path).rank(0).steps if s.values]
    assert math.isfinite(losses[-1]) and sum(losses[-100:]) < sum(losses[:100])  # it learned: a real run


# -- live and offline agree -------------------------------------------------------------------------------
def test_inspect_reports_the_firings_the_agent_made_at_the_same_steps(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The planted runs again, each read by the agent's ingest and by `gradwatch inspect` (the same state
    interpretation and engine, over the history): the same rules at the same steps, naming the same layers."""
    from gradwatch.cli import main
    from gradwatch.offline_rules import replay

    test_weight_update_ratio_too_large_and_too_small(tmp_path / "a")
    test_overfit_on_a_tiny_training_set(tmp_path / "b")
    test_a_layer_cut_off_by_a_detach_has_all_zero_gradients(tmp_path / "c")
    test_poor_weight_initialization_of_one_layer_times_100(tmp_path / "d")
    test_dead_relu_behind_a_large_negative_bias_in_an_mlp_and_a_cnn(tmp_path / "e")
    for home in (tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d", tmp_path / "e" / "mlp",
                 tmp_path / "e" / "cnn"):
        live = [(d.rule, d.step, d.details.get("layer")) for d in _firings(home)[0]]
        offline = [(d.rule, d.step, d.details.get("layer")) for d in replay(gradwatch.read_run("r", home).rank(0))]
        assert live and sorted(offline) == sorted(live)
    main(["inspect", "r", "--home", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "the catalogue (SageMaker Debugger's rules" in out
    assert "  all_zero at step 20: 100 % of `encoder`'s gradients are exactly zero" in out


# -- the spelling -----------------------------------------------------------------------------------------
def test_a_catalogue_rule_needs_no_metric_and_no_action() -> None:
    [rule] = parse_rules("rules:\n  - {name: dead, detect: {type: all_zero, threshold: 90}}\n", "r.yaml").rules
    assert rule.metric == "layer_grad_zero_fraction" and rule.action.type == "none" and rule.mode == "observe"
    assert rule.detect.threshold == 90  # type: ignore[union-attr]


def test_a_catalogue_rule_with_a_wrong_metric_or_acting_without_an_action_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="reads 'layer_update_ratio'; leave 'metric' out"):
        parse_rules("rules:\n  - {name: w, metric: loss, detect: {type: weight_update_ratio}}\n", "r.yaml")
    with pytest.raises(ConfigError, match=r"r\.yaml.*mode 'act' needs an action"):
        parse_rules("rules:\n  - {name: w, mode: act, detect: {type: input_bound}}\n", "r.yaml")


# -- the boundaries -----------------------------------------------------------------------------------------
def _detector(detect: str) -> Any:
    from gradwatch.rules.detectors import make_detector
    return make_detector(parse_rules(f"rules:\n  - {{name: x, detect: {detect}}}\n", "x.yaml").rules[0].detect)


def _feed(detector: Any, losses: list[float], interval: int = 1, vals: dict[int, float] | None = None) -> list[int]:
    from gradwatch.rules.detector_base import StepObservation
    fired = []
    for step, loss in enumerate(losses, start=1):
        values = {"loss": loss, **({"val_loss": vals[step]} if vals and step in vals else {})}
        if detector.observe(StepObservation(step, float(step), values)) is not None:
            fired.append(step)
    return fired


def test_loss_not_decreasing_at_exactly_diff_percent_and_exactly_the_increase() -> None:
    """interval 1, num_steps 2: the interval of step n closes at step n+1 and is compared with the one two
    before (dropped by diff_percent?) and the one before (up by more than increase_threshold_percent?), with the
    detector's own arithmetic: exactly at a bound is within it, the next float past it is not."""
    detect = "{type: loss_not_decreasing, interval: 1, num_steps: 2}"
    old, previous = 1000.0, 990.0
    dropped_enough = old - abs(old) * 0.1 / 100
    assert _feed(_detector(detect), [old, previous, dropped_enough, 0.0]) == []
    assert _feed(_detector(detect), [old, previous, math.nextafter(dropped_enough, math.inf), 0.0]) == [4]
    old, previous = 1000.0, 900.0
    up_at_most = previous + abs(previous) * 5 / 100  # 945: also 5.5 % below `old`
    assert _feed(_detector(detect), [old, previous, up_at_most, 0.0]) == []
    assert _feed(_detector(detect), [old, previous, math.nextafter(up_at_most, math.inf), 0.0]) == [4]


def test_overfit_at_exactly_the_ratio_and_with_a_gap_that_does_not_grow() -> None:
    detect = "{type: overfit, ratio_threshold: 0.25}"
    train = [1.0, 1.0, 0.5, 0.5]  # the training loss halves between the validations at steps 2 and 4
    assert _feed(_detector(detect), train, vals={2: 1.125, 4: 0.625}) == []  # 12.5 % then exactly 25 %: not over
    assert _feed(_detector(detect), train, vals={2: 1.25, 4: 0.625}) == []  # 25 % then 25 %: not growing
    assert _feed(_detector(detect), train, vals={2: 1.25, 4: 0.6875}) == [4]  # 25 % then 37.5 %, falling: yes


def _activation_sample(step: int, kind: str, shares: list[float], var: float = 1.0) -> ActivationsRecord:
    return ActivationsRecord(step=step, t=float(step), modules=["act"], kinds=[kind], feeders=["fc"],
                             units=[len(shares)], samples=[100], shares=[sorted(shares)], input_mean=[0.0],
                             input_var=[var])


def test_dead_relu_and_saturated_activation_at_exactly_their_thresholds() -> None:
    """A unit active in exactly threshold_inactivity % of its pairs is not dead (nor a tanh unit saturated in
    exactly that share saturated); a layer with exactly threshold_layer % of idle units is not over it."""
    dead = _detector("{type: dead_relu}")
    assert dead.observe(_activation_sample(1, "relu", [0.01] * 4)) is None  # active in exactly 1 %: alive
    assert dead.observe(_activation_sample(2, "relu", [0.0, 0.0, 0.5, 0.5])) is None  # exactly 50 % dead
    fired = dead.observe(_activation_sample(3, "relu", [0.0, 0.0, math.nextafter(0.01, 0), 0.5]))
    assert fired is not None and fired.details["value"] == 75.0 and fired.details["feeder"] == "fc"
    assert dead.holding() and dead.observe(_activation_sample(4, "relu", [0.0] * 4)) is None  # once per episode
    assert dead.observe(_activation_sample(5, "tanh", [0.0] * 4)) is None and not dead.holding()  # not a ReLU
    saturated = _detector("{type: saturated_activation}")
    assert saturated.observe(_activation_sample(1, "sigmoid", [0.01] * 4)) is None
    fired = saturated.observe(_activation_sample(2, "sigmoid", [math.nextafter(0.01, 1)] * 3 + [0.0]))
    assert fired is not None and fired.details["value"] == 75.0


def test_saturation_bounds_other_than_the_probes_are_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"threshold_tanh_max: the probe counts saturated inputs at smdebug's bounds"):
        parse_rules("rules:\n  - {name: s, detect: {type: saturated_activation, threshold_tanh_max: 5}}\n", "r.yaml")
    parse_rules("rules:\n  - {name: s, detect: {type: saturated_activation, threshold_tanh_max: 9.4999}}\n", "r.yaml")


def test_poor_weight_initialization_at_exactly_the_ratio_and_only_in_the_first_samples() -> None:
    from gradwatch.rules.detector_base import StepObservation

    def pair(step: int, ratio: float) -> ActivationsRecord:
        return ActivationsRecord(step=step, t=0.0, modules=["a", "b"], kinds=["relu", "relu"], feeders=["f", "g"],
                                 units=[4, 4], samples=[8, 8], shares=[[0.5] * 4] * 2, input_mean=[0.0, 0.0],
                                 input_var=[1.0, ratio])
    detector = _detector("{type: poor_weight_initialization, steps: 2}")
    assert detector.observe(pair(1, 10.0)) is None  # exactly threshold: not over it
    assert detector.observe(pair(2, 0.1)) is None  # 10x smaller: the same
    assert detector.observe(pair(3, 1e6)) is None  # a third sample is past `steps`
    fresh = _detector("{type: poor_weight_initialization}")
    fired = fresh.observe(pair(1, math.nextafter(10.0, math.inf)))
    assert fired is not None and (fired.details["layer"], fired.details["feeder"]) == ("b", "g")
    # (b): narrow gradients in every feeding layer and a loss that has not decreased in `patience` samples
    narrow = _detector("{type: poor_weight_initialization, patience: 2, distribution_range: 0.001}")
    narrow.observe(pair(1, 1.0))
    spread_per_abs_mean = 3.29 * math.sqrt(math.pi / 2)
    fired_at = []
    for k, loss in enumerate([1.0, 1.0, 1.0, 1.0], start=1):
        narrow.observe(StepObservation(10 * k, 0.0, {"loss": loss}))
        at = 0.001 / spread_per_abs_mean * (1 - 1e-9)  # a spread just under distribution_range
        sample = LayersRecord(step=10 * k, t=0.0, layers=["f", "g", "norm"], grad_norm=[1.0, 1.0, 1.0],
                              grad_abs_mean=[at, at / 2, 1.0])  # a norm layer's is wide: no matter
        if narrow.observe(sample) is not None:
            fired_at.append(10 * k)
    assert fired_at == [30]  # the third mean is not below the first within patience 2
    learning = _detector("{type: poor_weight_initialization, patience: 2}")
    learning.observe(pair(1, 1.0))
    for k, loss in enumerate([1.0, 1.0, 0.999, 0.998], start=1):
        learning.observe(StepObservation(10 * k, 0.0, {"loss": loss}))
        assert learning.observe(LayersRecord(step=10 * k, t=0.0, layers=["f", "g"], grad_norm=[1.0, 1.0],
                                             grad_abs_mean=[1e-9, 1e-9])) is None  # the loss decreases


def test_overtraining_counts_an_improvement_of_exactly_delta_as_none() -> None:
    detect = "{type: overtraining, interval: 1, patience_train: 2, patience_validation: 2, delta: 0.5}"
    # 8 -> 4 is exactly delta (50 %) better: no improvement, so both are stale one step sooner than with 3.999
    exactly = [8.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert _feed(_detector(detect), exactly, vals={k + 1: v for k, v in enumerate(exactly)}) == [4]
    better = [8.0, 3.999, 3.999, 3.999, 3.999, 3.999]
    assert _feed(_detector(detect), better, vals={k + 1: v for k, v in enumerate(better)}) == [5]


# -- what does not arrive ---------------------------------------------------------------------------------------
TIME_RULES = """
rules:
  - {name: stalled_training, detect: {type: stalled_training}}
  - {name: max_initialization_time, detect: {type: max_initialization_time}}
"""


def _steps(probe: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        probe.log(loss=loss)


def _tick(home: Path, now: float) -> tuple[list[Decision], AgentState]:
    """The run read by the agent, its states decided at ``now`` (as the agent's loop does), then its clock."""
    decisions, state = _firings(home, TIME_RULES)
    state.refresh(now, stall_after=120.0, ended_ttl=1e9, local_host="elsewhere")
    return decisions + state.tick_rules(now), state


def test_stalled_training_when_the_loop_stops_stepping(tmp_path: Path) -> None:
    """A real loop that has made 30 steps and then waits (its process alive, its probe open): 1800 s after its
    last step the rule fires, once; a finished run is never stalled."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradwatch.attach(model, opt, run="r", home=tmp_path, autostart_agent=False, flush_interval=0.01)
    try:
        _steps(probe, model, opt, 30)

        def written() -> bool:
            steps = gradwatch.read_run("r", tmp_path).rank(0).steps
            return bool(steps) and steps[-1].step == 30
        from tests.conftest import wait_until
        wait_until(written, what="the 30 steps in the spool")
        last = gradwatch.read_run("r", tmp_path).rank(0).steps[-1].t
        assert _tick(tmp_path, last + 1799)[0] == []
        decisions, state = _tick(tmp_path, last + 1801)
        [stalled] = decisions
        assert stalled.rule == "stalled_training" and stalled.step == 30
        assert stalled.details["evidence"].startswith("stalled_training at step 30: no optimizer step for 1801 s")
        assert state.tick_rules(last + 1900) == []  # once per stall
    finally:
        probe.close()
    assert _tick(tmp_path, last + 5000)[0] == []  # ended: finished, not stalled


def test_max_initialization_time_when_the_first_step_never_comes(tmp_path: Path) -> None:
    """The process started (its metadata is written when the probe opens the run) and has not stepped."""
    model = torch.nn.Linear(8, 1)
    probe = gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.01), run="r", home=tmp_path,
                             autostart_agent=False, flush_interval=0.01)
    try:
        probe.log(status=1.0)  # a script logging before its first step (a config value, a dataset size)
        from tests.conftest import wait_until
        wait_until(lambda: "r" in gradwatch.history.run_names(tmp_path) and gradwatch.read_run("r", tmp_path).ranks,
                   what="the run's metadata")
        started = gradwatch.read_run("r", tmp_path).rank(0).meta.start_time
        assert started is not None
        assert _tick(tmp_path, started + 20 * 60 - 1)[0] == []
        [late] = _tick(tmp_path, started + 20 * 60 + 1)[0]
        assert late.rule == "max_initialization_time" and late.step == 0
        assert "no first step 20.0 min after the process started" in late.details["evidence"]
    finally:
        probe.close()


@pytest.mark.integration
def test_a_real_agent_records_the_stall_it_sees(isolated_home: Path, agent_process: Any, tmp_path: Path) -> None:
    """The agent's own loop ticks the rules: a live run that stops stepping gets its stalled_training decision
    in events.jsonl (threshold 2 s here, 1800 s by default)."""
    from tests.conftest import wait_until

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: stall, detect: {type: stalled_training, threshold: 2}}\n")
    agent_process("--rules", str(rules))
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="paused", home=isolated_home, autostart_agent=False,
                          flush_interval=0.01) as probe:
        _steps(probe, model, opt, 5)

        def stalled() -> bool:
            return any(e.get("rule") == "stall" for e in gradwatch.read_run("paused", isolated_home).events)
        wait_until(stalled, timeout=30, what="the stall decision in events.jsonl")
    [event] = [e for e in gradwatch.read_run("paused", isolated_home).events if e.get("rule") == "stall"]
    assert event["step"] == 5 and event["details"]["evidence"].startswith("stalled_training at step 5")


# -- the GPUs' utilisation (NVML faked: no GPU here; tests/support/fake_nvml.py) ----------------------------------
def _gpu_ticks(detector: Any, readings: list[list[float]], *, stepping: bool = True) -> list[str]:
    from gradwatch.rules.detector_base import TickObservation
    reasons = []
    for k, utilization in enumerate(readings):
        now = 1000.0 + k
        trigger = detector.observe(TickObservation(now=now, step=k + 1, last_step_t=now - (1 if stepping else 600),
                                                   start_time=0.0, ended=False, gpu_utilization=tuple(utilization),
                                                   gpu_reading_t=now))
        if trigger is not None:
            reasons.append(f"{k + 1}:{trigger.reason}")
    return reasons


def test_low_gpu_utilization_at_its_percentile_boundaries() -> None:
    """window 20: p95 exactly threshold_p95 is not under-used, just under it is; p5 exactly threshold_p5 is not
    fluctuating, just under it is (numpy's linear percentile); a second GPU of the run is judged on its own."""
    detect = "{type: low_gpu_utilization, window: 20}"
    steady = [[0.70]] * 20
    assert _gpu_ticks(_detector(detect), steady) == []
    assert _gpu_ticks(_detector(detect), [[math.nextafter(0.70, 0)]] * 20) == ["20:low_gpu_utilization:under-used"]
    # threshold_p5 25 %: two readings at 25 % and 18 at 95 %: p5 (rank 0.95 of 19) is exactly 25 %, not under it
    fluctuating = "{type: low_gpu_utilization, window: 20, threshold_p5: 25}"
    assert _gpu_ticks(_detector(fluctuating), [[0.25]] * 2 + [[0.95]] * 18) == []
    low = math.nextafter(0.25, 0)
    assert _gpu_ticks(_detector(fluctuating), [[low]] * 2 + [[0.95]] * 18) == ["20:low_gpu_utilization:fluctuating"]
    two = _gpu_ticks(_detector(detect), [[0.9, 0.3]] * 20)
    assert two == ["20:low_gpu_utilization:under-used"]
    detector = _detector(detect)
    assert _gpu_ticks(detector, [[0.3]] * 19, stepping=False) == []  # a stall or an evaluation: not counted
    assert len(detector.readings) == 0


def _gpu_rule_firing(tmp_path: Path, device: str, gpus: Any = None) -> dict[str, Any]:
    """A real in-process agent (its GPU collector replaced by ``gpus`` when given) with low_gpu_utilization at
    window 10, and a real loop on ``device`` that sleeps 20 ms a step until the rule's event is in events.jsonl."""
    from gradwatch.agent.daemon import Agent
    from gradwatch.agent.settings import AgentConfig
    from tests.conftest import wait_until

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: gpu, detect: {type: low_gpu_utilization, window: 10}}\n")
    home = tmp_path / "home"
    agent = Agent(AgentConfig(home=home, port=0, rules_file=rules))
    if gpus is not None:
        agent.gpus = agent.collector.gpus = gpus
    agent.start()
    try:
        model = torch.nn.Linear(8, 1).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gradwatch.attach(model, opt, run="r", home=home, autostart_agent=False, flush_interval=0.01) as probe:
            def fired() -> bool:
                loss = model(torch.randn(4, 8, device=device)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                probe.log(loss=loss)
                time.sleep(0.02)
                return any(e.get("rule") == "gpu" for e in gradwatch.read_run("r", home).events)
            wait_until(fired, timeout=120, what="the low_gpu_utilization decision in events.jsonl")
    finally:
        agent.stop()
    [event] = [e for e in gradwatch.read_run("r", home).events if e.get("rule") == "gpu"]
    return event


def test_low_gpu_utilization_in_a_real_agent_with_a_faked_gpu(tmp_path: Path) -> None:
    """The agent's own loop: its GPU collector (NVML faked, one GPU listing this process) reads 30 % while a real
    loop steps; the rule (window 10) fires once, naming the GPU; the evidence is in events.jsonl."""
    import os

    from gradwatch.agent.gpus import GpuCollector
    from tests.support.fake_nvml import FakeGpu, FakeNvml

    event = _gpu_rule_firing(tmp_path, "cpu", GpuCollector(FakeNvml([FakeGpu(utilization=30, pids=[os.getpid()])]),
                                                           every=0.1))
    assert event["reason"] == "low_gpu_utilization:under-used"
    assert "the run's GPU 0 is under-used over the last 10 readings (p95 30 % < threshold_p95 70 %)" in \
        event["details"]["evidence"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU was lent to this task)")
def test_low_gpu_utilization_on_a_real_gpu_that_mostly_waits(tmp_path: Path) -> None:
    """On a GPU, with real NVML: a loop that sleeps 20 ms between tiny steps leaves its GPU under-used."""
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py (the agent's GPU collector reads NVML through it)")
    assert _gpu_rule_firing(tmp_path, "cuda")["reason"] == "low_gpu_utilization:under-used"
