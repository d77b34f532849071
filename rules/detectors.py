"""Detectors: online statistics over one metric's observations that say when a rule fires.

Pure Python (no torch), deterministic, and saved/restored with the agent's checkpoint, so a
restarted agent decides exactly as the first one would have. Non-finite values and detected
outliers never enter running statistics: one NaN or one spike cannot poison them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

from gradwatch.rules import config as cfg
from gradwatch.rules.catalogue import CATALOGUE_DETECTORS
from gradwatch.rules.detector_base import Detector, Trigger
from gradwatch.rules.ema import EmaZScore

__all__ = ["DETECTORS", "Detector", "Trigger", "make_detector"]


# -- the rule detectors -------------------------------------------------------------------------------
class NonFiniteDetector(Detector):
    def __init__(self, spec: cfg.NonFinite) -> None:
        self.spec = spec
        self.streak = 0

    def update(self, value: float) -> Trigger | None:
        if math.isfinite(value):
            self.streak = 0
            return None
        self.streak += 1
        if self.streak == self.spec.consecutive:  # once per streak
            return Trigger("nonfinite", {"value": value, "consecutive": self.streak})
        return None

    def holding(self) -> bool:
        return self.streak >= self.spec.consecutive


class SpikeDetector(Detector):
    def __init__(self, spec: cfg.Spike) -> None:
        self.spec = spec
        self.stats = EmaZScore(alpha=spec.alpha, threshold=spec.z_threshold, warmup=spec.warmup,
                               readapt_after=spec.readapt_after)

    def update(self, value: float) -> Trigger | None:
        z = self.stats.zscore(value) if math.isfinite(value) else None
        mean = self.stats.mean
        if self.stats.update(value):
            return Trigger("spike", {"value": value, "z": z, "mean": mean})
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state.get("stats", {}))


class DivergenceDetector(Detector):
    """Smoothed metric (EMA over finite values) far above its best, or rising for many observations."""

    def __init__(self, spec: cfg.Divergence) -> None:
        self.spec = spec
        self.count = 0
        self.smoothed: float | None = None
        self.best: float | None = None
        self.above = 0
        self.rising = 0

    def update(self, value: float) -> Trigger | None:
        s = self.spec
        if not math.isfinite(value):
            return None
        sign = 1.0 if s.mode == "min" else -1.0
        previous = self.smoothed
        smoothed = value if previous is None else previous + s.alpha * (value - previous)
        if not math.isfinite(smoothed):
            return None  # the difference of two huge values overflows: that value would poison the average for good
        self.smoothed = smoothed
        self.count += 1
        self.rising = self.rising + 1 if previous is not None and sign * (smoothed - previous) > 0 else 0
        if self.best is None or (self.count < s.warmup and sign * (smoothed - self.best) < 0):
            self.best = smoothed
        if self.count < s.warmup:
            return None
        ratio = (self.smoothed / self.best) if self.best > 0 else None
        if s.mode == "max" and ratio:
            ratio = 1.0 / ratio
        diverged = ratio is not None and ratio > s.factor
        self.above = self.above + 1 if diverged else 0
        trending = (s.trend_steps is not None and self.rising >= s.trend_steps and ratio is not None
                    and ratio > 1.0 + s.min_rise)
        if sign * (self.smoothed - self.best) < 0:
            self.best = self.smoothed
        if self.above == s.patience:
            return Trigger("divergence", {"value": value, "smoothed": self.smoothed, "best": self.best,
                                          "ratio": ratio})
        if trending and self.rising == s.trend_steps:
            return Trigger("divergence", {"value": value, "smoothed": self.smoothed, "best": self.best,
                                          "rising_for": self.rising})
        return None

    def holding(self) -> bool:
        return self.above >= self.spec.patience


class PlateauDetector(Detector):
    """``torch.optim.lr_scheduler.ReduceLROnPlateau.step`` without the LR change: fires when the
    scheduler would reduce (tested against torch on generated sequences)."""

    def __init__(self, spec: cfg.Plateau) -> None:
        self.spec = spec
        self.best = math.inf if spec.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def _is_better(self, a: float, best: float) -> bool:
        s = self.spec
        if s.mode == "min" and s.threshold_mode == "rel":
            return a < best * (1.0 - s.threshold)
        if s.mode == "min":
            return a < best - s.threshold
        if s.threshold_mode == "rel":
            return a > best * (s.threshold + 1.0)
        return a > best + s.threshold

    def update(self, value: float) -> Trigger | None:
        current = float(value)
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.spec.patience:
            bad = self.num_bad_epochs
            self.cooldown_counter = self.spec.cooldown
            self.num_bad_epochs = 0
            return Trigger("plateau", {"value": current, "best": self.best, "bad_checks": bad})
        return None


def _f32(x: float) -> float:
    """Round to the nearest float32 (as a Python float): emulates a float32 tensor operation."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


class EarlyStoppingDetector(Detector):
    """Lightning's ``EarlyStopping._evaluate_stopping_criteria`` (first matching branch wins), with
    Keras' ``baseline``: an improvement resets the patience only once it also beats the baseline.

    With ``dtype: float32`` the comparisons are rounded as Lightning's float32 tensors round them.
    """

    def __init__(self, spec: cfg.EarlyStopping) -> None:
        self.spec = spec
        self.best = math.inf if spec.mode == "min" else -math.inf
        self.wait_count = 0
        self.stopped = False

    def _round(self, x: float) -> float:
        return _f32(x) if self.spec.dtype == "float32" else x

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.spec.mode == "min" else a > b

    def update(self, value: float) -> Trigger | None:
        s = self.spec
        current = self._round(float(value))
        signed_delta = s.min_delta if s.mode == "max" else -s.min_delta
        details: dict[str, Any] = {"value": current, "best": self.best}
        reason = None
        if s.check_finite and not math.isfinite(current):
            reason = "non_finite_metric"
        elif s.stopping_threshold is not None and self._better(current, self._round(s.stopping_threshold)):
            reason = "stopping_threshold"
        elif s.divergence_threshold is not None and self._better(-current, -self._round(s.divergence_threshold)):
            reason = "divergence_threshold"
        # Lightning subtracts the Python float min_delta from a float32 tensor: torch casts it to float32 first
        elif self._better(self._round(current - self._round(signed_delta)), self.best):
            self.best = current
            if s.baseline is None or self._better(current, self._round(s.baseline)):
                self.wait_count = 0
            else:
                self.wait_count += 1  # improving, but not yet past the baseline: never stops here
            return None
        else:
            self.wait_count += 1
            if self.wait_count >= s.patience:
                reason = "patience_exhausted"
                details["bad_checks"] = self.wait_count
        if reason is None or self.stopped:
            return None
        self.stopped = True
        return Trigger(reason, details)


class ThresholdDetector(Detector):
    def __init__(self, spec: cfg.Threshold) -> None:
        self.spec = spec
        self.streak = 0

    def update(self, value: float) -> Trigger | None:
        s = self.spec
        crossed = (s.above is not None and value > s.above) or (s.below is not None and value < s.below)
        self.streak = self.streak + 1 if crossed else 0
        if self.streak == s.patience:
            return Trigger("threshold", {"value": value, "above": s.above, "below": s.below})
        return None

    def holding(self) -> bool:
        return self.streak >= self.spec.patience


#: One detector per kind of detector spec, keyed on the spec's class: a new spec without a detector fails
#: the test that walks cfg.DETECTOR_SPECS (tests/rules/test_detectors.py).
DETECTORS: dict[type[cfg.DetectorSpecs], Callable[[Any], Detector]] = {
    cfg.NonFinite: NonFiniteDetector, cfg.Spike: SpikeDetector, cfg.Divergence: DivergenceDetector,
    cfg.Plateau: PlateauDetector, cfg.EarlyStopping: EarlyStoppingDetector, cfg.Threshold: ThresholdDetector,
    **CATALOGUE_DETECTORS,
}


def make_detector(spec: cfg.DetectorSpecs) -> Detector:
    return DETECTORS[type(spec)](spec)
