"""The catalogue's detectors: SageMaker Debugger's rules (names, parameters, defaults), live at step resolution.

Each reads what its type implies: a step (``StepObservation``: the loss, gradient norm, LR, step time, data wait
the agent interprets from the step's record) or a periodic layer sample (``LayersRecord``, every
``layer_stats_every`` steps: per-layer gradient norm, mean absolute gradient, share of zero gradients, update/
weight ratio). A layer rule fires when a layer starts to break it (once per layer and episode) and holds while any
layer does; every trigger carries its evidence in words (rule, step, layer, the figure against the threshold,
since when, what to try). Where smdebug's literal definition would fire on a healthy run, the detector adds the
condition that makes it a sign of trouble (docs/rules.md, "The catalogue", says which and why).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from gradwatch.rules import catalogue_specs as spec
from gradwatch.rules.detector_base import Detector, Observation, StepObservation, Trigger
from gradwatch.spool.records import LayersRecord

#: vanishing_gradient: a layer's mean |gradient| under the threshold is a vanishing gradient when another layer's
#: is this many times larger (gradients that are small everywhere are a converged model, not a broken flow)
VANISHING_SPREAD = 1000.0
SHOWN_LAYERS = 5


def _since(step: int, since: int) -> str:
    return f" since step {since}" if since < step else ""


class _LayerRule(Detector):
    """A rule judged per layer at each periodic layer sample (on-trigger spike samples are not periodic)."""

    inputs: ClassVar[frozenset[str]] = frozenset({"layers"})
    reason: ClassVar[str]

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.offending: dict[str, int] = {}  # layer -> the sampled step since which it breaks the rule

    def offenders(self, record: LayersRecord) -> dict[str, float]:
        """The layers that break the rule at this sample, with their figure, worst first."""
        raise NotImplementedError

    def evidence(self, record: LayersRecord, layer: str, figure: float, since: int, others: int) -> str:
        raise NotImplementedError

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, LayersRecord):
            return self.observe_step(observation)
        if observation.trigger:
            return None
        found = self.offenders(observation)
        step = observation.step
        new = [layer for layer in found if layer not in self.offending]
        self.offending = {layer: self.offending.get(layer, step) for layer in found}
        if not new:
            return None
        layer = new[0]
        figure = found[layer]
        text = self.evidence(observation, layer, figure, self.offending[layer], len(found) - 1)
        return Trigger(self.reason, {"layer": layer, "value": figure, "layers": new[:SHOWN_LAYERS],
                                     "since": self.offending[layer], "evidence": text})

    def observe_step(self, observation: StepObservation) -> Trigger | None:
        return None

    def holding(self) -> bool:
        return bool(self.offending)


def _finite(names: list[str], values: list[float | None]) -> dict[str, float]:
    return {name: v for name, v in zip(names, values, strict=False) if v is not None and math.isfinite(v)}


def _and_others(others: int) -> str:
    return f" (and {others} more layer(s))" if others else ""


class VanishingGradientDetector(_LayerRule):
    reason = "vanishing_gradient"

    def offenders(self, record: LayersRecord) -> dict[str, float]:
        means = _finite(record.layers, record.grad_abs_mean)
        if not means:
            return {}
        top = max(means.values())
        low = {n: v for n, v in means.items() if v < self.spec.threshold and top >= VANISHING_SPREAD * max(v, 1e-300)}
        return dict(sorted(low.items(), key=lambda item: item[1]))

    def evidence(self, record: LayersRecord, layer: str, figure: float, since: int, others: int) -> str:
        means = _finite(record.layers, record.grad_abs_mean)
        top_layer = max(means, key=means.__getitem__)
        return (f"vanishing_gradient at step {record.step}: the mean |gradient| of `{layer}` is {figure:.3g}, below "
                f"threshold {self.spec.threshold:g}{_since(record.step, since)}{_and_others(others)}, while "
                f"`{top_layer}`'s is {means[top_layer]:.3g}; try residual connections, normalisation layers, "
                "ReLU-like activations instead of saturating ones, or a better initialisation")


class AllZeroDetector(_LayerRule):
    """At two periodic samples in a row: a zero-initialised layer zeroes the gradients before it for its first
    updates only, which is no fault."""

    reason = "all_zero"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.zero_before: list[str] = []  # the layers at or over the threshold at the previous sample

    def offenders(self, record: LayersRecord) -> dict[str, float]:
        shares = _finite(record.layers, record.grad_zero_fraction)
        over = {n: 100.0 * v for n, v in shares.items() if 100.0 * v >= self.spec.threshold - 1e-9}
        before, self.zero_before = set(self.zero_before), list(over)
        return {n: v for n, v in over.items() if n in before}

    def evidence(self, record: LayersRecord, layer: str, figure: float, since: int, others: int) -> str:
        return (f"all_zero at step {record.step}: {figure:.4g} % of `{layer}`'s gradients are exactly zero "
                f"(threshold {self.spec.threshold:g} %){_since(record.step, since)}{_and_others(others)}; try: is "
                "it on the loss's path (a detach(), a no_grad(), an unused branch)? Do the ReLUs feeding it never "
                "fire (a large negative bias)?")


class WeightUpdateRatioDetector(_LayerRule):
    """The probe's ratio is ``||dw|| / ||w||``; ``epsilon`` matters only for a weight of norm near it. A layer
    whose weights were all zero before the update has no ratio (a zero-initialised parameter): skipped. A sample
    of a step whose update was skipped (a guard, GradScaler) is not judged, nor the small bound while the learning
    rate is under ``ANNEALED`` of the highest the run has had (a warm-up from 0, a schedule annealed to 0: the
    updates are meant to be tiny then)."""

    ANNEALED: ClassVar[float] = 0.01

    inputs = frozenset({"layers", "step"})
    reason = "weight_update_ratio"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.lr: float | None = None
        self.peak_lr = 0.0
        self.skipped: list[int] = []  # the latest steps whose update was skipped

    def observe_step(self, observation: StepObservation) -> Trigger | None:
        lr = observation.values.get("lr")
        if lr is not None and math.isfinite(lr):
            self.lr, self.peak_lr = lr, max(self.peak_lr, lr)
        if observation.values.get("update_skipped"):
            self.skipped = [*self.skipped[-3:], observation.step]
        return None

    def offenders(self, record: LayersRecord) -> dict[str, float]:
        if record.step in self.skipped:
            return dict.fromkeys(self.offending, 0.0)  # nothing moved on purpose: the layers stay as they were
        s = self.spec
        ratios = {n: r for n, r in record.update_ratio.items() if math.isfinite(r)}
        large = {n: r for n, r in ratios.items() if r > s.large_threshold}
        annealed = self.lr is not None and self.lr <= self.ANNEALED * self.peak_lr
        small = {} if annealed else {n: r for n, r in ratios.items() if r < s.small_threshold}
        return {**dict(sorted(large.items(), key=lambda i: -i[1])), **dict(sorted(small.items(), key=lambda i: i[1]))}

    def evidence(self, record: LayersRecord, layer: str, figure: float, since: int, others: int) -> str:
        s = self.spec
        if figure > s.large_threshold:
            what = (f"above large_threshold {s.large_threshold:g}: the update is larger than the weights; try a lower "
                    "learning rate (for it), a longer warm-up, or gradient clipping")
        else:
            what = (f"below small_threshold {s.small_threshold:g}: it barely changes; a learning rate too low for it, "
                    "weight decay holding it, or gradients that do not reach it")
        return (f"weight_update_ratio at step {record.step}: `{layer}`'s update/weight ratio is {figure:.3g}"
                f"{_since(record.step, since)}{_and_others(others)}, {what}")


class ExplodingTensorDetector(Detector):
    """The loss or the gradient norm non-finite: once per stretch of such steps. The trigger's reason is
    ``nonfinite``, so the alert also carries the probe's ``origin`` (which layer, forward or backward)."""

    inputs = frozenset({"step"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.streak = 0

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, StepObservation):
            return None
        bad = [(name, value) for name in ("loss", "grad_norm")
               if (value := observation.values.get(name)) is not None and self._exploded(value)]
        if not bad:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak > 1:
            return None
        name, value = bad[0]
        what = "loss" if name == "loss" else "gradient norm"
        kind = "NaN" if value != value else str(value)
        return Trigger("nonfinite", {"value": value, "tensor": name, "evidence": (
            f"exploding_tensor at step {observation.step}: the {what} is {kind}"
            + (" (and the gradient norm)" if len(bad) > 1 else "") + "; the layer it came from is in the alert's "
            "origin and in gradwatch inspect; try: the batch and the learning rate at that step, and in that layer "
            "a log(0), a division by a small number or an fp16 overflow (bf16, or GradScaler)")})

    def _exploded(self, value: float) -> bool:
        return value != value or (not self.spec.only_nan and math.isinf(value))

    def holding(self) -> bool:
        return self.streak > 0


class InputBoundDetector(Detector):
    """The median share of data wait in step time over the last ``window`` steps: the steps after an in-loop
    evaluation or a checkpoint wait long once, which no median notices."""

    inputs = frozenset({"step"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.shares: deque[float] = deque(maxlen=spec.window)
        self.bound = False

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, StepObservation):
            return None
        wait, duration = observation.values.get("data_wait_seconds"), observation.values.get("step_duration_seconds")
        if wait is None or not duration or duration <= 0 or not math.isfinite(wait) or not math.isfinite(duration):
            return None
        self.shares.append(min(max(wait / duration, 0.0), 1.0))
        if len(self.shares) < self.spec.window:
            return None
        share = 100.0 * statistics.median(self.shares)
        was, self.bound = self.bound, share > self.spec.threshold
        if not self.bound or was:
            return None
        return Trigger("input_bound", {"value": share, "threshold": self.spec.threshold, "evidence": (
            f"input_bound at step {observation.step}: the training waited for data {share:.0f} % of each step over "
            f"the last {self.spec.window} steps (median; threshold {self.spec.threshold:g} %); try more DataLoader "
            "workers (num_workers), pin_memory=True, persistent_workers, prefetching, or data that is cheaper to "
            "load")})

    def holding(self) -> bool:
        return self.bound

    def state_dict(self) -> dict[str, Any]:
        return {"shares": list(self.shares), "bound": self.bound}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shares = deque((float(v) for v in state.get("shares", [])), maxlen=self.spec.window)
        self.bound = bool(state.get("bound", False))


CATALOGUE_DETECTORS: dict[type[Any], Callable[[Any], Detector]] = {
    spec.VanishingGradient: VanishingGradientDetector, spec.ExplodingTensor: ExplodingTensorDetector,
    spec.WeightUpdateRatio: WeightUpdateRatioDetector, spec.AllZero: AllZeroDetector,
    spec.InputBound: InputBoundDetector,
}
