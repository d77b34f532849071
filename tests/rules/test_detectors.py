"""Detectors fire on what they should, and what they catch never poisons their statistics."""

from __future__ import annotations

import math
import random

import pytest

from gradwatch.agent.state import RankState
from gradwatch.probes.guards import AutoClip, GradientGuards, ZClip
from gradwatch.rules import config as cfg
from gradwatch.rules.config import parse_rules
from gradwatch.rules.detectors import (
    DivergenceDetector,
    EmaZScore,
    NonFiniteDetector,
    SpikeDetector,
    ThresholdDetector,
)
from gradwatch.rules.engine import RunRules
from gradwatch.spool.records import LogRecord, Record, RunMeta, StepRecord


def _noise(n: int, seed: int = 0, level: float = 1.0) -> list[float]:
    rng = random.Random(seed)
    return [level + 0.05 * rng.gauss(0, 1) for _ in range(n)]


def test_ema_zscore_statistics_ignore_nan_and_spikes_exactly() -> None:
    clean, dirty = EmaZScore(), EmaZScore()
    for i, value in enumerate(_noise(300)):
        clean.update(value)
        dirty.update(value)
        if i in (50, 120, 121, 200):
            assert dirty.update(math.nan) is False
            assert dirty.update(value * 40) is True  # a spike: flagged, kept out
            assert dirty.update(math.inf) is False
    assert dirty.state_dict() == clean.state_dict()


def test_a_spike_right_after_a_nan_is_still_caught() -> None:
    """A rolling window fed a NaN goes blind for the whole window; this detector does not."""
    detector = SpikeDetector(cfg.Spike(type="spike"))
    for value in _noise(100):
        detector.update(value)
    assert detector.update(math.nan) is None
    trigger = detector.update(20.0)
    assert trigger is not None and trigger.reason == "spike" and trigger.details["z"] > 6


def test_spike_detector_readapts_when_the_level_truly_moves() -> None:
    detector = SpikeDetector(cfg.Spike(type="spike", readapt_after=5))
    for value in _noise(100):
        detector.update(value)
    fired = [detector.update(v) is not None for v in _noise(60, seed=1, level=10.0)]
    assert fired[:5] == [True] * 5 and not any(fired[30:]), "after 5 spikes in a row the new level is normal"


def test_nonfinite_fires_once_per_streak_of_the_configured_length() -> None:
    detector = NonFiniteDetector(cfg.NonFinite(type="nonfinite", consecutive=2))
    fired = [detector.update(v) is not None for v in (1.0, math.nan, 1.0, math.nan, math.inf, math.nan, 1.0, math.nan,
                                                      math.nan)]
    assert fired == [False, False, False, False, True, False, False, False, True]


def test_divergence_fires_when_the_smoothed_metric_stays_above_k_times_its_best() -> None:
    detector = DivergenceDetector(cfg.Divergence(type="divergence", factor=3.0, patience=5, warmup=20, alpha=0.5))
    values = _noise(50, level=1.0) + [math.nan] + [1.0 + 0.5 * i for i in range(40)]
    fired = [i for i, v in enumerate(values) if detector.update(v) is not None]
    assert len(fired) == 1
    first_above = next(i for i in range(51, len(values)) if values[i] > 3.0)
    assert first_above < fired[0] < first_above + 10
    assert detector.best == pytest.approx(min(_noise(50)), abs=0.2)  # the NaN never became the best


def test_divergence_trend_fires_on_a_sustained_rise() -> None:
    detector = DivergenceDetector(cfg.Divergence(type="divergence", factor=100.0, trend_steps=15, min_rise=0.2,
                                                 warmup=10, alpha=0.3))
    values = _noise(30) + [1.0 + 0.03 * i for i in range(40)]
    fired = [i for i, v in enumerate(values) if detector.update(v) is not None]
    assert len(fired) == 1 and fired[0] >= 30 + 15


def test_threshold_needs_patience_consecutive_observations() -> None:
    detector = ThresholdDetector(cfg.Threshold(type="threshold", below=5.0, patience=3))
    fired = [detector.update(v) is not None for v in (6, 4, 4, 6, 4, 4, 4, 4)]
    assert fired == [False, False, False, False, False, False, True, False]


def test_autoclip_history_never_holds_nonfinite_norms() -> None:
    """AutoClip's reference keeps NaN in its history: every later percentile is NaN, and
    clip_grad_norm_(max_norm=NaN) then turns every gradient into NaN. Ours ignores them."""
    clean, dirty = AutoClip(10, 1000), AutoClip(10, 1000)
    for i, norm in enumerate(_noise(200)):
        clean.add(norm)
        dirty.add(norm)
        if i % 37 == 0:
            dirty.add(math.nan)
            dirty.add(math.inf)
    assert dirty.threshold() == clean.threshold() and math.isfinite(dirty.threshold() or math.nan)


def test_zclip_ema_is_not_poisoned_by_a_nan_norm() -> None:
    clip_cfg = cfg.ClipGuard(scheme="zclip", max_norm=None)
    clean, dirty = ZClip(clip_cfg), ZClip(clip_cfg)
    for i, norm in enumerate(_noise(200)):
        clean.decide(norm)
        dirty.decide(norm)
        if i in (10, 100):  # once in warm-up, once after
            _, coef = dirty.decide(math.nan)
            assert coef == 1.0
    assert (dirty.mean, dirty.var) == (clean.mean, clean.var) and math.isfinite(dirty.mean or math.nan)
    _, coef = dirty.decide(50.0)
    assert coef < 0.1, "after the NaN, ZClip still clips a spike"


def test_spike_skip_guard_keeps_skipped_norms_out_of_its_statistics() -> None:
    guards = GradientGuards(cfg.Guards(skip=cfg.SkipGuard(on_spike="act", spike_warmup=20)))
    reference = EmaZScore(alpha=0.02, threshold=10.0, warmup=20, readapt_after=10**9)
    for i, norm in enumerate(_noise(200)):
        reference.update(norm)
        assert guards.decide(norm).skip is None
        if i % 50 == 49:
            assert guards.decide(norm * 100).skip == "spike"
    ours, theirs = guards.spike_stats.state_dict(), reference.state_dict()
    assert (ours["count"], ours["mean"], ours["var"]) == (theirs["count"], theirs["mean"], theirs["var"])


def test_rule_bounds_cooldown_and_max_actions() -> None:
    config = parse_rules("""
rules:
  - name: hot
    metric: temp
    detect: {type: threshold, above: 1}
    action: {type: stop}
    mode: act
    cooldown_steps: 10
    max_actions: 2
""", "x.yaml")
    rules = RunRules("r", config, "agent")
    fired = []
    for step in range(1, 60):
        fired += [d.step for d in rules.observe(step, float(step), {"temp": 2.0 if step % 3 == 0 else 0.0})]
    assert fired == [3, 15]
    assert rules.decisions == {("hot", "stop", "act"): 2}


def test_engine_state_survives_a_save_and_restore_and_a_changed_rule_restarts() -> None:
    text = """
rules:
  - name: plateau
    metric: val_loss
    detect: {type: plateau, patience: 3}
    action: {type: reduce_lr}
"""
    config = parse_rules(text, "x.yaml")
    first = RunRules("r", config, "agent")
    for step in range(1, 5):
        first.observe(step, 0.0, {"val_loss": 1.0})
    second = RunRules("r", config, "agent")
    second.load_state_dict(first.state_dict())
    assert [d.reason for d in second.observe(5, 0.0, {"val_loss": 1.0})] == ["plateau"]
    changed = RunRules("r", parse_rules(text.replace("patience: 3", "patience: 30"), "x.yaml"), "agent")
    changed.load_state_dict(first.state_dict())
    assert changed.states["plateau"].detector.num_bad_epochs == 0  # type: ignore[attr-defined]


def _observations(*records: Record) -> dict[str, float]:
    state = RankState(run="r", rank=0, meta=RunMeta(run="r", rank=0, world_size=1), spike_window=60.0)
    observed: dict[str, float] = {}
    for record in records:
        observed.update(state.apply(record))
    return observed


EXPECTED_OBSERVATIONS = {"grad_norm": 2.0, "lr": 0.1, "step_duration_seconds": 0.5, "data_wait_seconds": 0.1,
                         "steps_per_second": 2.0, "samples_per_second": 64.0, "loss": 1.5, "batch_size": 32.0,
                         "val_loss": 1.7}


def test_metric_names_cover_record_fields_and_logged_scalars() -> None:
    step = StepRecord(step=3, t=0.0, grad_norm=2.0, lr=[0.1, 0.2], dur=0.5, wait=0.1,
                      values={"loss": 1.5, "batch_size": 32, "val_loss": 1.7})
    assert _observations(step) == EXPECTED_OBSERVATIONS


def test_a_step_and_its_scalars_in_two_records_give_the_same_observations() -> None:
    """The writer merges the scalars logged after a step into its record when both are queued; when they are
    not, the log record that follows means the same to the rules."""
    step = StepRecord(step=3, t=0.0, grad_norm=2.0, lr=[0.1, 0.2], dur=0.5, wait=0.1)
    logged = LogRecord(step=3, t=0.0, values={"loss": 1.5, "batch_size": 32, "val_loss": 1.7})
    assert _observations(step, logged) == EXPECTED_OBSERVATIONS
    later = LogRecord(step=2, t=0.0, values={"batch_size": 32})  # not this step's: no rate from its duration
    assert "samples_per_second" not in _observations(step, later)


def test_every_kind_of_detector_spec_has_its_detector() -> None:
    from typing import get_args

    from gradwatch.rules.detectors import DETECTORS, make_detector

    assert set(DETECTORS) == set(cfg.DETECTOR_SPECS)
    for spec in cfg.DETECTOR_SPECS:
        tag = get_args(spec.model_fields["type"].annotation)[0]
        made = make_detector(spec.model_validate({"type": tag, **({"above": 1.0} if tag == "threshold" else {})}))
        assert type(made) is DETECTORS[spec]
