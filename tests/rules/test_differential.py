"""The rules decide exactly as the references they are named after, on generated sequences:
torch's ReduceLROnPlateau, Lightning's EarlyStopping, the zclip package, and AutoClip's
Algorithm 1 (the paper's pseudo-code, written out below with numpy's percentile)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.probes.guards import AutoClip, GradientGuards
from gradwatch.rules import config as cfg
from gradwatch.rules.detectors import EarlyStoppingDetector, PlateauDetector
from gradwatch.rules.lr import min_lr_for, reduced_lr

# Few distinct values make ties and exact threshold hits common; NaN and infinities are the edges.
_VALUES = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.0001, 0.9999, 2.0, -1.0, -0.5, math.nan, math.inf, -math.inf]),
                    st.floats(-3, 3, allow_nan=False, width=32))
SEQUENCES = st.lists(_VALUES, min_size=1, max_size=80)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def plateau_settings(draw: st.DrawFn) -> dict:  # type: ignore[type-arg]
    groups = draw(st.integers(1, 3))
    min_lr = draw(st.one_of(st.sampled_from([0.0, 1e-4, 0.05]),
                            st.lists(st.sampled_from([0.0, 1e-3, 0.02]), min_size=groups, max_size=groups)))
    return {
        "mode": draw(st.sampled_from(["min", "max"])), "factor": draw(st.sampled_from([0.1, 0.5, 0.9])),
        "patience": draw(st.integers(0, 4)), "threshold": draw(st.sampled_from([0.0, 1e-4, 0.1])),
        "threshold_mode": draw(st.sampled_from(["rel", "abs"])), "cooldown": draw(st.integers(0, 3)),
        "min_lr": min_lr, "eps": draw(st.sampled_from([1e-8, 0.0, 0.01])), "groups": groups,
        "lr": draw(st.sampled_from([0.1, 1.0, 0.011])),
    }


@SETTINGS
@given(p=plateau_settings(), values=SEQUENCES)
def test_reduce_lr_on_plateau_matches_torch(p: dict, values: list[float]) -> None:  # type: ignore[type-arg]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(p["groups"])]
    optimizer = torch.optim.SGD([{"params": [x]} for x in params], lr=p["lr"])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=p["mode"], factor=p["factor"], patience=p["patience"], threshold=p["threshold"],
        threshold_mode=p["threshold_mode"], cooldown=p["cooldown"], min_lr=p["min_lr"], eps=p["eps"])
    detector = PlateauDetector(cfg.Plateau(type="plateau", mode=p["mode"], patience=p["patience"],
                                           threshold=p["threshold"], threshold_mode=p["threshold_mode"],
                                           cooldown=p["cooldown"]))
    action = cfg.ReduceLR(type="reduce_lr", factor=p["factor"], min_lr=p["min_lr"], eps=p["eps"])
    ours = [p["lr"]] * p["groups"]
    for i, value in enumerate(values):
        scheduler.step(value)
        if detector.update(value) is not None:  # the agent decides, the probe applies the same arithmetic
            ours = [reduced_lr(lr, action.factor, min_lr_for(action.min_lr, g), action.eps)
                    for g, lr in enumerate(ours)]
        theirs = [group["lr"] for group in optimizer.param_groups]
        assert ours == theirs, f"step {i} (value {value}): ours {ours}, torch {theirs}"
        assert detector.num_bad_epochs == scheduler.num_bad_epochs
        assert detector.cooldown_counter == scheduler.cooldown_counter


@st.composite
def early_stopping_settings(draw: st.DrawFn) -> dict:  # type: ignore[type-arg]
    return {
        "mode": draw(st.sampled_from(["min", "max"])), "min_delta": draw(st.sampled_from([0.0, 1e-4, 0.1, -0.1])),
        "patience": draw(st.integers(0, 4)), "check_finite": draw(st.booleans()),
        "stopping_threshold": draw(st.sampled_from([None, 0.5, -0.5])),
        "divergence_threshold": draw(st.sampled_from([None, 2.0, -2.0])),
    }


@SETTINGS
@given(p=early_stopping_settings(), values=SEQUENCES)
def test_early_stopping_matches_lightning(p: dict, values: list[float]) -> None:  # type: ignore[type-arg]
    from lightning.pytorch.callbacks import EarlyStopping

    theirs = EarlyStopping(monitor="val_loss", **p)
    ours = EarlyStoppingDetector(cfg.EarlyStopping(type="early_stopping", **p))
    for i, value in enumerate(values):
        should_stop, _ = theirs._evaluate_stopping_criteria(torch.tensor(value, dtype=torch.float32))
        trigger = ours.update(value)
        assert (trigger is not None) == should_stop, f"check {i} (value {value})"
        assert ours.wait_count == theirs.wait_count
        if should_stop:
            assert trigger is not None and trigger.reason == theirs.stopping_reason.name.lower()
            break  # Lightning's Trainer stops here


def _progression(start: float, delta: float, n: int = 14) -> list[float]:
    """Each value exactly ``delta`` past the previous one: every check lands on ``best ± min_delta``."""
    return [start + k * delta for k in range(n)]


def _float32_progression(start: float, delta: float, n: int = 14) -> list[float]:
    """The same, stepped in float32 (a metric accumulated in float32 tensors, as Lightning logs them)."""
    x, d, out = torch.tensor(start, dtype=torch.float32), torch.tensor(delta, dtype=torch.float32), []
    for _ in range(n):
        out.append(float(x))
        x = x + d
    return out


ES_BOUNDARIES = [
    (mode, min_delta, sign, start, patience, make)
    for mode in ("min", "max") for min_delta in (0.1, 0.3, 0.01, 1e-4, 0.0) for sign in (1, -1)
    for start in (0.0, 1.0, -0.7, 0.25) for patience in (0, 1, 2) for make in (_progression, _float32_progression)
]


@pytest.mark.parametrize(("mode", "min_delta", "sign", "start", "patience", "make"), ES_BOUNDARIES)
def test_early_stopping_matches_lightning_when_improvements_equal_min_delta(
        mode: str, min_delta: float, sign: int, start: float, patience: int, make: object) -> None:
    """Improvements of exactly min_delta (and ties when it is 0): where float32 rounding decides. A real
    Trainer with mode=max, min_delta=0.1 on 0.0, 0.1, 0.2, ... stopped one check later than gradwatch said."""
    from lightning.pytorch.callbacks import EarlyStopping

    values = make(start, sign * (min_delta or 0.05))  # type: ignore[operator]
    theirs = EarlyStopping(monitor="val", mode=mode, min_delta=min_delta, patience=patience)
    ours = EarlyStoppingDetector(cfg.EarlyStopping(type="early_stopping", mode=mode, min_delta=min_delta,
                                                   patience=patience))
    for i, value in enumerate(values):
        should_stop, _ = theirs._evaluate_stopping_criteria(torch.tensor(value, dtype=torch.float32))
        trigger = ours.update(value)
        assert ours.wait_count == theirs.wait_count, f"check {i} (value {value!r})"
        assert (trigger is not None) == should_stop, f"check {i} (value {value!r})"
        if should_stop:
            break


PLATEAU_BOUNDARIES = [
    (mode, threshold_mode, threshold, start, patience)
    for mode in ("min", "max") for threshold_mode in ("rel", "abs") for threshold in (1e-4, 0.1, 0.5, 0.0)
    for start in (1.0, 0.3, 10.0, -2.0) for patience in (0, 1, 3)
]


@pytest.mark.parametrize(("mode", "threshold_mode", "threshold", "start", "patience"), PLATEAU_BOUNDARIES)
def test_plateau_matches_torch_when_changes_equal_the_threshold(mode: str, threshold_mode: str, threshold: float,
                                                                start: float, patience: int) -> None:
    """Each value exactly at ``best·(1 ∓ threshold)`` (rel) or ``best ∓ threshold`` (abs): the boundary."""
    sign = -1 if mode == "min" else 1
    values = [start]
    for _ in range(15):
        best = values[-1]
        values.append(best * (1 + sign * threshold) if threshold_mode == "rel" else best + sign * threshold)
    values += [values[-1]] * 3  # then ties
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=patience,
                                                           threshold=threshold, threshold_mode=threshold_mode)
    detector = PlateauDetector(cfg.Plateau(type="plateau", mode=mode, patience=patience, threshold=threshold,
                                           threshold_mode=threshold_mode))
    lr = 1.0
    for i, value in enumerate(values):
        scheduler.step(value)
        if detector.update(value) is not None:
            lr = reduced_lr(lr, 0.5, 0.0, 1e-8)
        assert detector.num_bad_epochs == scheduler.num_bad_epochs, f"check {i} (value {value!r})"
        assert lr == optimizer.param_groups[0]["lr"], f"check {i} (value {value!r})"


def test_early_stopping_baseline_holds_patience_until_beaten() -> None:
    """Keras' baseline: improvements that do not beat the baseline do not reset the patience."""
    detector = EarlyStoppingDetector(cfg.EarlyStopping(type="early_stopping", patience=3, baseline=1.0))
    assert [detector.update(v) is None for v in (2.0, 1.9, 1.8)] == [True, True, True]
    assert detector.wait_count == 3  # improving, but never past the baseline
    trigger = detector.update(1.85)
    assert trigger is not None and trigger.reason == "patience_exhausted"
    beaten = EarlyStoppingDetector(cfg.EarlyStopping(type="early_stopping", patience=2, baseline=1.0))
    for v in (2.0, 0.9, 0.95):
        assert beaten.update(v) is None
    assert beaten.wait_count == 1


def _zclip_pair(seed: int, steps: int, **kwargs: object) -> None:
    """Same gradients through the reference package and our guard; the clipped gradients must agree."""
    from zclip import ZClip as Reference

    gen = torch.Generator().manual_seed(seed)
    reference_model = torch.nn.Linear(6, 3).double()
    reference = Reference(**kwargs)  # type: ignore[arg-type]
    guard_cfg = cfg.ClipGuard(scheme="zclip", alpha=kwargs.get("alpha", 0.97), z_threshold=kwargs.get("z_thresh", 2.5),
                              max_norm=kwargs.get("max_grad_norm", 1.0), warmup=kwargs.get("warmup_steps", 25),
                              clip_factor=kwargs.get("clip_factor", 1.0))
    ours = GradientGuards(cfg.Guards(clip=guard_cfg, skip=cfg.SkipGuard(on_nonfinite="off")))
    for step in range(steps):
        scale = 1.0 + (25.0 if step % 17 == 16 else 0.0) + 0.3 * math.sin(step / 5)
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale for p in reference_model.parameters()]
        for p, g in zip(reference_model.parameters(), grads, strict=True):
            p.grad = g.clone()
        reference.step(reference_model)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        decision = ours.decide(norm)
        expected = [p.grad for p in reference_model.parameters()]
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g * decision.coef, e, rtol=1e-9, atol=1e-12, msg=f"step {step}")
    assert reference.mean == pytest.approx(ours.zclip.mean, rel=1e-9)  # type: ignore[union-attr]
    assert reference.var == pytest.approx(ours.zclip.var, rel=1e-6)  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zclip_matches_the_reference_package_with_its_defaults(seed: int) -> None:
    _zclip_pair(seed, 120)


@pytest.mark.parametrize("kwargs", [{"max_grad_norm": None}, {"max_grad_norm": None, "z_thresh": 2.0, "alpha": 0.9,
                                                             "warmup_steps": 10, "clip_factor": 0.7}])
def test_zclip_matches_the_reference_package_without_a_cap(kwargs: dict) -> None:  # type: ignore[type-arg]
    _zclip_pair(3, 150, **kwargs)


@SETTINGS
@given(norms=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=200), percentile=st.sampled_from([0, 1, 10, 25, 50, 90,
                                                                                                   100]))
def test_autoclip_threshold_is_the_papers_percentile_of_the_history(norms: list[float], percentile: float) -> None:
    """AutoClip Algorithm 1: append the current norm, clip to np.percentile(history, p)."""
    auto = AutoClip(percentile, history=10_000)
    history: list[float] = []
    for norm in norms:
        history.append(norm)
        auto.add(norm)
        assert auto.threshold() == np.percentile(history, percentile)


def test_autoclip_history_is_bounded() -> None:
    auto = AutoClip(50, history=3)
    for norm in (100.0, 1.0, 2.0, 3.0):
        auto.add(norm)
    assert auto.threshold() == 2.0 and len(auto.sorted) == 3
