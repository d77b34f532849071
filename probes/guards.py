"""In-probe guards: clip and skip at the same step, in the optimizer's pre-step hook.

The decisions (thresholds, spike tests) are made on the host from the step's gradient norm.
On CPU reading the norm costs nothing. On CUDA, the fixed threshold and the non-finite skip
are done on the device without a synchronisation (a clamp; the fused optimizers' ``found_inf``);
AutoClip, ZClip and the spike skip need the norm on the host, which costs one
synchronisation per step (attach() warns once; see docs/rules.md).

Non-finite norms never enter any statistic: one NaN would otherwise turn AutoClip's
percentile or ZClip's EMA into NaN for good.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradwatch.rules.clip import scaled_threshold
from gradwatch.rules.ema import EmaZScore

if TYPE_CHECKING:  # pydantic is loaded at attach(), not when the probe is imported
    from gradwatch.rules.config import ClipGuard, Guards

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6)


@dataclass
class GuardDecision:
    threshold: float | None = None  # the clipping threshold in force at this step
    coef: float = 1.0  # gradients are multiplied by this (< 1: clipped)
    skip: str | None = None  # "nonfinite", "spike" or "rewind": skip this update
    observed_skip: str | None = None  # a skip guard in observe mode would have skipped

    @property
    def clipped(self) -> bool:
        return self.coef < 1.0


class AutoClip:
    """Seetharaman et al. 2020 (arXiv 2007.14469), Algorithm 1: append the norm to the history, clip
    to the ``percentile``-th percentile of the history (numpy's linear interpolation). The history
    is bounded (``history`` newest norms) and holds finite norms only."""

    def __init__(self, percentile: float, history: int) -> None:
        self.q = percentile / 100.0
        self.capacity = history
        self.order: deque[float] = deque()  # arrival order, for eviction
        self.sorted: list[float] = []

    def add(self, norm: float) -> None:
        if not math.isfinite(norm):
            return
        self.order.append(norm)
        bisect.insort(self.sorted, norm)
        if len(self.order) > self.capacity:
            old = self.order.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, old)]

    def threshold(self) -> float | None:
        values = self.sorted
        if not values:
            return None
        index = self.q * (len(values) - 1)
        lo = math.floor(index)
        hi = min(lo + 1, len(values) - 1)
        t = index - lo
        a, b = values[lo], values[hi]
        diff = b - a
        return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t  # numpy's _lerp, bit for bit


class ZClip:
    """Kumar et al. 2025 (arXiv 2504.02507), as the reference package zclip 1.0.0 (mode zscore,
    adaptive_scaling): EMA mean/variance of the norm, a z-score spike test, and a reciprocal
    threshold ``(mu + z_t * sigma / (z / z_t)) * clip_factor``; the clipped value feeds the EMA.
    Differences, on purpose: non-finite norms are ignored (the reference's EMA turns NaN for good)."""

    def __init__(self, cfg: ClipGuard) -> None:
        self.alpha = cfg.alpha
        self.z_threshold = cfg.z_threshold
        self.warmup = cfg.warmup
        self.clip_factor = cfg.clip_factor
        self.eps = cfg.eps
        self.max_norm = cfg.max_norm
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def decide(self, norm: float) -> tuple[float | None, float]:
        """(threshold, coef) for this norm; updates the statistics."""
        if not math.isfinite(norm):
            return self.max_norm, 1.0
        if self.mean is None:  # warm-up: collect, clip at max_norm as clip_grad_norm_ does
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup:
                n = len(self.buffer)
                self.mean = sum(self.buffer) / n
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / n
                self.buffer = []
            if self.max_norm is None:
                return None, 1.0
            return self.max_norm, min(1.0, self.max_norm / (norm + CLIP_EPS))
        std = self.var ** 0.5
        mean = self.mean
        z = (norm - mean) / (std + self.eps)
        adaptive = None
        if z > self.z_threshold:
            adaptive = (mean + (self.z_threshold * std) / (z / self.z_threshold)) * self.clip_factor
        effective = adaptive if adaptive is not None else norm
        if self.max_norm is not None:
            effective = min(effective, self.max_norm)
        coef = effective / (norm + CLIP_EPS) if norm > effective else 1.0
        x = adaptive if adaptive is not None else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        # Exported threshold: the norm above which ZClip starts clipping (mu + z_t * sigma, capped).
        threshold = mean + self.z_threshold * std
        if self.max_norm is not None:
            threshold = min(threshold, self.max_norm)
        return threshold, coef


class GradientGuards:
    """The guards section of a rules configuration, applied to one optimizer's steps."""

    def __init__(self, guards: Guards, dry_run: bool = False) -> None:
        def mode(m: str) -> str:
            return "observe" if dry_run and m == "act" else m

        self.skip_nonfinite = mode(guards.skip.on_nonfinite)
        self.skip_spike = mode(guards.skip.on_spike)
        self.clip_mode = mode(guards.clip.mode)
        self.scheme = guards.clip.scheme
        self.fixed_threshold = guards.clip.max_norm
        self.spike_stats = EmaZScore(alpha=guards.skip.spike_alpha, threshold=guards.skip.spike_z_threshold,
                                     warmup=guards.skip.spike_warmup, readapt_after=10**9)
        self.autoclip = AutoClip(guards.clip.percentile, guards.clip.history) if self.scheme == "autoclip" else None
        self.zclip = ZClip(guards.clip) if self.scheme == "zclip" else None
        self.skip_next = 0  # updates still to skip after a rewind

    @property
    def active(self) -> bool:
        return (self.skip_nonfinite != "off" or self.skip_spike != "off" or self.scheme != "none"
                or self.skip_next > 0)

    @property
    def only_nonfinite_skip(self) -> bool:
        """The default: nothing but the non-finite skip acts (the probe's fast path)."""
        return (self.skip_nonfinite == "act" and self.skip_spike == "off" and self.scheme == "none"
                and self.skip_next == 0)

    @property
    def needs_host_norm(self) -> bool:
        """Whether deciding needs the norm's value on the host (a sync on CUDA)."""
        return self.skip_spike != "off" or self.scheme in ("autoclip", "zclip")

    def scale_fixed_threshold(self, factor: float, low: float, high: float) -> float:
        if self.scheme != "fixed" or self.fixed_threshold is None:
            raise ValueError(f"scale_clip needs guards.clip.scheme 'fixed' (this run uses {self.scheme!r})")
        self.fixed_threshold = scaled_threshold(self.fixed_threshold, factor, low, high)
        return self.fixed_threshold

    def state_dict(self) -> dict[str, Any]:
        """What the guards decide with (saved with the probe's state: a resumed run clips as before)."""
        return {"scheme": self.scheme, "fixed_threshold": self.fixed_threshold, "skip_next": self.skip_next,
                "spike": self.spike_stats.state_dict(),
                "autoclip": list(self.autoclip.order) if self.autoclip is not None else None,
                "zclip": {"buffer": list(self.zclip.buffer), "mean": self.zclip.mean, "var": self.zclip.var}
                if self.zclip is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of state_dict(); statistics of another clip scheme than this run's are left out."""
        self.skip_next = int(state.get("skip_next", 0))
        self.spike_stats.load_state_dict(state.get("spike") or {})
        if state.get("scheme") != self.scheme:
            return
        if self.scheme == "fixed" and isinstance(state.get("fixed_threshold"), (int, float)):
            self.fixed_threshold = float(state["fixed_threshold"])
        if self.autoclip is not None:
            for norm in state.get("autoclip") or []:
                self.autoclip.add(float(norm))
        zclip = state.get("zclip")
        if self.zclip is not None and isinstance(zclip, dict):
            self.zclip.buffer = [float(v) for v in zclip.get("buffer", [])]
            self.zclip.mean = None if zclip.get("mean") is None else float(zclip["mean"])
            self.zclip.var = float(zclip.get("var", 0.0))

    def decide(self, norm: float) -> GuardDecision:
        """Everything the guards do at one step with gradient norm ``norm`` (host float)."""
        decision = GuardDecision()
        finite = math.isfinite(norm)
        if self.skip_next > 0:
            self.skip_next -= 1
            decision.skip = "rewind"
        if not finite and self.skip_nonfinite != "off":
            self._skip(decision, "nonfinite", self.skip_nonfinite)
        if finite and self.skip_spike != "off" and self.spike_stats.update(norm):
            self._skip(decision, "spike", self.skip_spike)
        if decision.skip is None:
            threshold, coef = self._clip(norm)
            decision.threshold = threshold
            decision.coef = coef if self.clip_mode == "act" else 1.0
        return decision

    @staticmethod
    def _skip(decision: GuardDecision, reason: str, mode: str) -> None:
        if mode == "act":
            decision.skip = decision.skip or reason
        else:
            decision.observed_skip = decision.observed_skip or reason

    def _clip(self, norm: float) -> tuple[float | None, float]:
        if self.scheme == "none" or not math.isfinite(norm):
            return (self.fixed_threshold if self.scheme == "fixed" else None), 1.0
        if self.scheme == "fixed":
            assert self.fixed_threshold is not None
            return self.fixed_threshold, min(1.0, self.fixed_threshold / (norm + CLIP_EPS))
        if self.autoclip is not None:
            self.autoclip.add(norm)
            threshold = self.autoclip.threshold()
            return threshold, (1.0 if threshold is None else min(1.0, threshold / (norm + CLIP_EPS)))
        assert self.zclip is not None
        return self.zclip.decide(norm)
