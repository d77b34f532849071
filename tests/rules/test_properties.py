"""Every configuration the rules schema accepts, against every value a run can log (hypothesis).

The configurations are drawn from the schema itself: each field of each detector and action model, with
its type and its bounds (``gt``, ``ge``, ``lt``, ``le``) read from the pydantic model, biased towards the
boundaries (exactly ``ge``, the float just above ``gt``, zero, the largest floats) and kept only when the
model accepts them. The values include NaN, infinities, signed zeros, subnormals, float32's extremes and
the largest doubles. A detector must never raise, must survive its own checkpoint (a JSON round trip) and
go on exactly as before it; an action's arithmetic must give a finite, non-negative LR and a finite,
positive clip threshold, or refuse.
"""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Any, Literal

import annotated_types
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from gradwatch.rules import config as cfg
from gradwatch.rules.catalogue_specs import CATALOGUE_SPECS
from gradwatch.rules.clip import scaled_threshold
from gradwatch.rules.config import parse_rules
from gradwatch.rules.detector_base import StepObservation, TickObservation
from gradwatch.rules.detectors import make_detector
from gradwatch.rules.engine import RunRules
from gradwatch.rules.lr import min_lr_for, reduced_lr
from gradwatch.spool.records import ActivationsRecord, LayersRecord

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FLOAT32_MAX = 3.4028234663852886e38
SPECIAL_VALUES = [0.0, -0.0, 1.0, -1.0, 1e-4, 5e-324, -5e-324, 2.2250738585072014e-308, 1e-45, FLOAT32_MAX,
                  -FLOAT32_MAX, 1.7976931348623157e308, -1.7976931348623157e308, math.inf, -math.inf, math.nan]
VALUES = st.one_of(st.sampled_from(SPECIAL_VALUES), st.floats(allow_nan=True, allow_infinity=True),
                   st.floats(-10, 10), st.integers(-(2**63), 2**63).map(float))


def _bounded_float(metadata: list[Any]) -> st.SearchStrategy[float]:
    low = high = None
    low_open = high_open = False
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            low, low_open = float(item.gt), True
        elif isinstance(item, annotated_types.Ge):
            low = float(item.ge)
        elif isinstance(item, annotated_types.Lt):
            high, high_open = float(item.lt), True
        elif isinstance(item, annotated_types.Le):
            high = float(item.le)
    edges = [v for v in SPECIAL_VALUES if not math.isnan(v)]
    if low is not None:
        edges += [math.nextafter(low, math.inf) if low_open else low, low + 1e-9, low * 2 + 1]
    if high is not None:
        edges += [math.nextafter(high, -math.inf) if high_open else high]
    inside = st.floats(min_value=low, max_value=high, exclude_min=low_open, exclude_max=high_open,
                       allow_nan=False, allow_infinity=False)
    return st.one_of(st.sampled_from(edges), inside)


def _bounded_int(metadata: list[Any]) -> st.SearchStrategy[int]:
    low = next((int(m.ge) for m in metadata if isinstance(m, annotated_types.Ge)), None)
    low = next((int(m.gt) + 1 for m in metadata if isinstance(m, annotated_types.Gt)), low)
    edges = [0, 1, 2, 3, 10**9, 2**63 - 1] + ([low, low + 1] if low is not None else [])
    return st.one_of(st.sampled_from(edges), st.integers(min_value=low, max_value=(low or 0) + 500))


def _for_annotation(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return st.sampled_from(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_for_annotation(arg, metadata) for arg in typing.get_args(annotation)))
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is float:
        return _bounded_float(metadata)
    if annotation is int:
        return _bounded_int(metadata)
    if origin is list:
        return st.lists(_for_annotation(typing.get_args(annotation)[0], metadata), max_size=4)
    raise AssertionError(f"no strategy for {annotation!r}: extend the property test")


def configurations(model: type[BaseModel]) -> st.SearchStrategy[BaseModel]:
    """Instances of ``model`` built field by field from its schema; only the ones it accepts."""
    fields = {name: _for_annotation(info.annotation, list(info.metadata)) for name, info in model.model_fields.items()}

    def accepted(values: dict[str, Any]) -> BaseModel | None:
        try:
            return model.model_validate(values)
        except ValidationError:
            return None

    return st.fixed_dictionaries(fields).map(accepted).filter(lambda m: m is not None)  # type: ignore[return-value]


SCALAR_SPECS = [spec for spec in cfg.DETECTOR_SPECS if spec not in CATALOGUE_SPECS]
DETECTOR_CONFIGS = st.one_of(*(configurations(spec) for spec in SCALAR_SPECS))
CATALOGUE_CONFIGS = st.one_of(*(configurations(spec) for spec in CATALOGUE_SPECS))
MAYBE = st.one_of(st.none(), VALUES)
LAYER_NAMES = st.lists(st.sampled_from(["0", "2", "blocks.0.attn", "(root)", "head"]), max_size=5, unique=True)


@st.composite
def layer_samples(draw: st.DrawFn, step: int) -> LayersRecord:
    layers = draw(LAYER_NAMES)
    return LayersRecord(step=step, t=float(step), layers=layers,
                        grad_norm=draw(st.lists(MAYBE, min_size=len(layers), max_size=len(layers))),
                        grad_abs_mean=draw(st.lists(MAYBE, max_size=len(layers))),
                        grad_zero_fraction=draw(st.lists(MAYBE, max_size=len(layers))),
                        update_ratio=draw(st.dictionaries(st.sampled_from(layers or ["x"]), VALUES, max_size=3)),
                        trigger=draw(st.sampled_from(["", "", "spike:loss"])))


@st.composite
def activation_samples(draw: st.DrawFn, step: int) -> ActivationsRecord:
    modules = draw(LAYER_NAMES)
    n = len(modules)
    return ActivationsRecord(
        step=step, t=float(step), modules=modules,
        kinds=draw(st.lists(st.sampled_from(["relu", "tanh", "sigmoid", "gelu", ""]), max_size=n)),
        feeders=draw(st.lists(st.sampled_from(["", "0", "fc"]), max_size=n)),
        units=draw(st.lists(st.integers(0, 10), max_size=n)), samples=draw(st.lists(st.integers(0, 10), max_size=n)),
        shares=draw(st.lists(st.lists(st.floats(0, 1), max_size=4), max_size=n)),
        input_mean=draw(st.lists(MAYBE, max_size=n)), input_var=draw(st.lists(MAYBE, max_size=n)))


@st.composite
def observations(draw: st.DrawFn) -> list[Any]:
    """A run's steps and layer samples, in order: every field may be missing, non-finite or extreme."""
    out: list[Any] = []
    for step in range(1, draw(st.integers(0, 40)) + 1):
        names = draw(st.lists(st.sampled_from(["loss", "grad_norm", "lr", "step_duration_seconds",
                                                "data_wait_seconds", "update_skipped", "val_loss"]), unique=True))
        out.append(StepObservation(step, float(step), {name: draw(VALUES) for name in names}))
        if draw(st.booleans()):
            out.append(draw(layer_samples(step)))
        if draw(st.booleans()):
            out.append(draw(activation_samples(step)))
        if draw(st.booleans()):  # the agent's clock, with the run's GPUs' readings
            out.append(TickObservation(now=step + draw(st.floats(0, 1e4)), step=step, last_step_t=float(step),
                                       start_time=draw(st.one_of(st.none(), st.floats(0, 10))),
                                       ended=draw(st.booleans()),
                                       gpu_utilization=tuple(draw(st.lists(VALUES, max_size=3))),
                                       gpu_reading_t=draw(st.one_of(st.none(), st.floats(0, 1e4)))))
    return out


@SETTINGS
@given(spec=CATALOGUE_CONFIGS, seen=observations(), cut=st.integers(0, 80))
def test_no_catalogue_detector_raises_and_each_goes_on_exactly_after_its_checkpoint(spec: Any, seen: list[Any],
                                                                                    cut: int) -> None:
    detector = make_detector(spec)
    for observation in seen[:cut]:
        trigger = detector.observe(observation)
        assert trigger is None or isinstance(trigger.details.get("evidence"), str)
        detector.holding()
    saved = json.loads(json.dumps(detector.state_dict()))
    restored = make_detector(spec)
    restored.load_state_dict(saved)
    for observation in seen[cut:]:
        a, b = detector.observe(observation), restored.observe(observation)
        assert (a is None) == (b is None) and (a is None or b is None or a.details == b.details)
        assert detector.holding() == restored.holding()


@SETTINGS
@given(spec=CATALOGUE_CONFIGS, seen=observations(), mode=st.sampled_from(["observe", "act"]))
def test_the_engine_never_raises_on_any_accepted_catalogue_rule(spec: Any, seen: list[Any], mode: str) -> None:
    rule = {"name": "r", "detect": spec.model_dump(mode="json"), "mode": mode,
            **({"action": {"type": "stop"}} if mode == "act" else {})}
    rules = RunRules("run", parse_rules(json.dumps({"rules": [rule]}), "generated.yaml"), "agent")
    for observation in seen:
        if isinstance(observation, (LayersRecord, ActivationsRecord)):
            decisions = rules.observe_sample(observation)
        elif isinstance(observation, TickObservation):
            decisions = rules.tick(observation)
        else:
            decisions = rules.observe(observation.step, observation.t, observation.values)
        for decision in decisions:
            json.dumps(decision.to_json())
            rules.acknowledged(decision.id)
    assert rules.failed_rules == {}, rules.failed_rules


def test_every_detector_spec_and_action_has_a_strategy() -> None:
    for model in (*cfg.DETECTOR_SPECS, cfg.ReduceLR, cfg.ScaleClip, cfg.Rewind, cfg.Stop):
        for name, info in model.model_fields.items():
            assert _for_annotation(info.annotation, list(info.metadata)) is not None, (model, name)


@SETTINGS
@given(spec=DETECTOR_CONFIGS, values=st.lists(VALUES, max_size=120), cut=st.integers(0, 120))
def test_no_detector_raises_and_each_goes_on_exactly_after_its_checkpoint(spec: Any, values: list[float],
                                                                          cut: int) -> None:
    detector = make_detector(spec)
    for value in values[:cut]:
        trigger = detector.update(value)
        assert trigger is None or isinstance(trigger.reason, str)
        detector.holding()
    # the agent's checkpoint: JSON with NaN and infinities
    saved = json.loads(json.dumps(detector.state_dict()))
    restored = make_detector(spec)
    restored.load_state_dict(saved)
    for value in values[cut:]:
        a, b = detector.update(value), restored.update(value)
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.reason == b.reason
        assert detector.holding() == restored.holding()


@SETTINGS
@given(spec=DETECTOR_CONFIGS, values=st.lists(VALUES, max_size=60), mode=st.sampled_from(["observe", "act"]),
       max_actions=st.sampled_from([None, 1, 2]), cooldown=st.sampled_from([0, 1, 5]))
def test_the_engine_never_raises_on_any_accepted_rule(spec: Any, values: list[float], mode: str,
                                                       max_actions: int | None, cooldown: int) -> None:
    rule = {"name": "r", "metric": "loss", "detect": spec.model_dump(mode="json"), "action": {"type": "stop"},
            "mode": mode, "max_actions": max_actions, "cooldown_steps": cooldown}
    config = parse_rules(json.dumps({"rules": [rule]}), "generated.yaml")
    rules = RunRules("run", config, "agent")
    for step, value in enumerate(values, start=1):
        for decision in rules.observe(step, 1000.0 + step, {"loss": value}):
            json.dumps(decision.to_json())  # what the agent writes to events.jsonl
            rules.acknowledged(decision.id)
    assert rules.failed_rules == {}, rules.failed_rules  # a failure would disable the rule: none may happen


@SETTINGS
@given(action=configurations(cfg.ReduceLR), lrs=st.lists(st.one_of(st.sampled_from([0.0, 5e-324, 1e-8, 1.0, 1e308]),
                                                                    st.floats(0, 10)), min_size=1, max_size=4),
       times=st.integers(1, 30))
def test_reduce_lr_gives_a_finite_non_negative_lr_that_never_grows(action: Any, lrs: list[float], times: int) -> None:
    for group, start in enumerate(lrs):
        floor, lr = min_lr_for(action.min_lr, group), start
        for _ in range(times):
            new = reduced_lr(lr, action.factor, floor, action.eps)
            assert math.isfinite(new) and new >= 0
            assert new <= lr or new == floor  # it only goes down, or up to min_lr (torch does the same)
            lr = new


@SETTINGS
@given(action=configurations(cfg.ScaleClip), current=st.one_of(st.sampled_from([5e-324, 1e-3, 1.0, 1e308]),
                                                                st.floats(1e-6, 1e6)), times=st.integers(1, 30))
def test_scale_clip_keeps_a_finite_positive_threshold(action: Any, current: float, times: int) -> None:
    assume(math.isfinite(current) and current > 0)
    for _ in range(times):
        current = scaled_threshold(current, action.factor, action.min_max_norm, action.max_max_norm)
        assert math.isfinite(current) and current > 0


@pytest.mark.parametrize("model", [cfg.Rewind, cfg.Stop])
def test_the_other_actions_validate_at_their_boundaries(model: type[BaseModel]) -> None:
    @SETTINGS
    @given(action=configurations(model))
    def check(action: Any) -> None:
        assert json.loads(json.dumps(action.model_dump(mode="json")))["type"] == action.type

    check()
