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
from itertools import pairwise
from typing import Any, ClassVar

from gradwatch.rules import catalogue_specs as spec
from gradwatch.rules.detector_base import Detector, Observation, StepObservation, TickObservation, Trigger
from gradwatch.spool.records import ActivationsRecord, LayersRecord

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
        if isinstance(observation, StepObservation):
            return self.observe_step(observation)
        if not isinstance(observation, LayersRecord) or observation.trigger:
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
        # exactly zero is all_zero's (a detach(), ReLUs that never fire): a vanishing gradient is small, not absent
        low = {n: v for n, v in means.items() if 0 < v < self.spec.threshold and top >= VANISHING_SPREAD * v}
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


class UnchangedTensorDetector(WeightUpdateRatioDetector):
    """smdebug compared a layer's weights between saved steps, 500 training steps apart in its rule
    configurations; the probe measures one update at each sample. The change is taken as that update times
    ``SMDEBUG_SAVE_INTERVAL`` (the same meaning whatever ``layer_stats_every``), and a layer is unchanged when that
    is at most ``rtol`` of its weights, at ``num_steps`` of its samples in a row, while the run's learning rate
    is not 0 (nor annealed to under 1 % of its highest). The probe's ratio has no weight norm beside it, so
    ``atol`` (an absolute tolerance per element) is not applied. A layer frozen on purpose (requires_grad off)
    has no ratio."""

    reason = "unchanged_tensor"
    SMDEBUG_SAVE_INTERVAL: ClassVar[int] = 500

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.still: dict[str, int] = {}  # layer -> its samples in a row with a change at most rtol

    def offenders(self, record: LayersRecord) -> dict[str, float]:
        apart = self.SMDEBUG_SAVE_INTERVAL
        if record.step in self.skipped:
            return dict.fromkeys(self.offending, 0.0)
        annealed = self.lr is None or self.lr <= self.ANNEALED * self.peak_lr
        for layer, ratio in record.update_ratio.items():
            if math.isfinite(ratio):
                unchanged = ratio * apart <= self.spec.rtol and not annealed
                self.still[layer] = self.still.get(layer, 0) + 1 if unchanged else 0
        if len(self.still) > 10_000:  # bounded: layers come and go only with the model
            self.still = {k: v for k, v in self.still.items() if v}
        return {layer: record.update_ratio.get(layer, 0.0) for layer, n in self.still.items()
                if n >= self.spec.num_steps}

    def evidence(self, record: LayersRecord, layer: str, figure: float, since: int, others: int) -> str:
        return (f"unchanged_tensor at step {record.step}: `{layer}`'s weights have not changed at its last "
                f"{self.still[layer]} samples (update/weight ratio {figure:.3g}, rtol {self.spec.rtol:g}) while the "
                f"learning rate is {self.lr:.3g}{_and_others(others)}; frozen by mistake? Check its param group's "
                "lr, that the optimizer has its parameters, and that its gradients reach it")


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


class GpuMemoryIncreaseDetector(Detector):
    """A leak grows the allocator's reserve at every reading; a healthy run reserves what it needs in its first
    steps and then stays flat, which is no growth at *each* reading. The trigger says at which step the device
    would be full at the rate of the window."""

    inputs = frozenset({"step"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.readings: deque[tuple[int, float]] = deque(maxlen=spec.window + 1)
        self.growing = False

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, StepObservation):
            return None
        reserved = observation.values.get("cuda_memory_reserved_bytes")
        if reserved is None or not math.isfinite(reserved) or reserved < 0:
            return None
        self.readings.append((observation.step, reserved))
        window = list(self.readings)
        if len(window) <= self.spec.window:
            return None
        (first_step, first), (last_step, last) = window[0], window[-1]
        each = all(b > a for (_, a), (_, b) in pairwise(window))
        grown = first > 0 and 100.0 * (last - first) / first > self.spec.increase
        was, self.growing = self.growing, each and grown
        if not self.growing or was:
            return None
        total = observation.values.get("cuda_memory_total_bytes")
        rate = (last - first) / max(last_step - first_step, 1)  # bytes per step
        full = (f"; at this rate the device's {total / 2**30:.3g} GiB are full at about step "
                f"{last_step + int((total - last) / rate)}" if total and total > last and rate > 0 else "")
        return Trigger("gpu_memory_increase", {"value": last, "grown_percent": 100.0 * (last - first) / first,
                                               "evidence": (
            f"gpu_memory_increase at step {observation.step}: the CUDA allocator's reserved memory grew at each of "
            f"the last {self.spec.window} readings, {first / 2**20:.4g} -> {last / 2**20:.4g} MiB since step "
            f"{first_step} (+{100.0 * (last - first) / first:.3g} %, increase {self.spec.increase:g} %){full}; try: "
            "tensors kept across steps (a loss appended to a list without .item() or .detach(), a growing cache), "
            "or sequence lengths that keep growing")})

    def holding(self) -> bool:
        return self.growing

    def state_dict(self) -> dict[str, Any]:
        return {"readings": [list(r) for r in self.readings], "growing": self.growing}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.readings = deque(((int(a), float(b)) for a, b in state.get("readings", [])), maxlen=self.spec.window + 1)
        self.growing = bool(state.get("growing", False))


class StalledTrainingDetector(Detector):
    """Judged on the agent's clock against the newest step's time: once per stall, re-armed by the next step.
    A run whose process ended (finished, crashed, interrupted) is not stalled."""

    inputs = frozenset({"tick"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.stalled_at: int | None = None  # the step the run stalled after

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, TickObservation):
            return None
        if observation.ended or observation.last_step_t is None:
            self.stalled_at = None
            return None
        waited = observation.now - observation.last_step_t
        if waited <= self.spec.threshold:
            self.stalled_at = None
            return None
        if self.stalled_at == observation.step:
            return None
        self.stalled_at = observation.step
        return Trigger("stalled_training", {"value": waited, "evidence": (
            f"stalled_training at step {observation.step}: no optimizer step for {waited:.0f} s (threshold "
            f"{self.spec.threshold:g} s) and the process has not ended; try py-spy dump --pid to see where it waits "
            "(a hung data loader, a collective waiting on a rank that died, a stuck filesystem)")})

    def holding(self) -> bool:
        return self.stalled_at is not None


class MaxInitializationTimeDetector(Detector):
    """From the process's start (the run's metadata) to its first step, on the agent's clock; once."""

    inputs = frozenset({"tick"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.fired = False
        self.waiting = False

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, TickObservation):
            return None
        self.waiting = False
        if observation.step or observation.ended or observation.start_time is None or self.fired:
            return None
        waited = observation.now - observation.start_time
        if waited <= 60.0 * self.spec.threshold:
            return None
        self.fired = self.waiting = True
        return Trigger("max_initialization_time", {"value": waited, "evidence": (
            f"max_initialization_time: no first step {waited / 60:.1f} min after the process started (threshold "
            f"{self.spec.threshold:g} min); try py-spy dump --pid: a dataset being built or downloaded, a "
            "torch.compile, a process group waiting for its ranks")})

    def holding(self) -> bool:
        return self.waiting


def _validation(values: dict[str, float]) -> float | None:
    """A validation loss, as the frameworks log it (Lightning: val_loss; Transformers: eval_loss)."""
    value = values.get("val_loss", values.get("eval_loss"))
    return value if value is not None and math.isfinite(value) else None


class _TrainingLoss:
    """The training loss as samples: the mean of its finite values over each ``interval`` of steps (single
    minibatch losses are noise), or since the last validation."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.total, self.count, self.start = 0.0, 0, 0  # the open interval
        self.since_total, self.since_count = 0.0, 0  # since the last validation

    def add(self, step: int, values: dict[str, float]) -> tuple[int, int, float] | None:
        """Feed a step; the interval it closes as (first step, last step, mean loss), or None."""
        closed = None
        if self.count and step >= self.start + self.interval:
            closed = (self.start, self.start + self.interval - 1, self.total / self.count)
            self.total, self.count = 0.0, 0
        if not self.count:
            self.start = step - (step - 1) % self.interval if step >= 1 else step
        loss = values.get("loss")
        if loss is not None and math.isfinite(loss) and abs(loss) < 1e300:
            self.total, self.count = self.total + loss, self.count + 1
            self.since_total, self.since_count = self.since_total + loss, self.since_count + 1
        return closed

    def since_validation(self) -> float | None:
        """The mean training loss since the last validation (and start a new span)."""
        mean = self.since_total / self.since_count if self.since_count else None
        self.since_total, self.since_count = 0.0, 0
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "count": self.count, "start": self.start, "since_total": self.since_total,
                "since_count": self.since_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in ("total", "since_total"):
                setattr(self, key, float(value))
            elif key in ("count", "start", "since_count"):
                setattr(self, key, int(value))


class LossNotDecreasingDetector(Detector):
    """Compares interval means, never single minibatch losses: the mean of steps 901-1000 against that of steps
    1-100 (``num_steps`` 10 intervals of 100: smdebug's 10 saved steps, saved every 100 steps)."""

    inputs = frozenset({"step"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.train = _TrainingLoss(spec.interval)
        self.means: deque[tuple[int, int, float]] = deque(maxlen=spec.num_steps + 1)
        self.stuck = False

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, StepObservation):
            return None
        closed = self.train.add(observation.step, observation.values)
        if closed is None:
            return None
        self.means.append(closed)
        if len(self.means) <= self.spec.num_steps:
            return None
        s = self.spec
        (a0, a1, old), (p0, p1, previous), (n0, n1, new) = self.means[0], self.means[-2], self.means[-1]
        not_dropped = new > old - abs(old) * s.diff_percent / 100
        rose = new > previous + abs(previous) * s.increase_threshold_percent / 100
        was, self.stuck = self.stuck, not_dropped or rose
        if not self.stuck or was:
            return None
        if rose:
            up = f"up {100 * (new - previous) / abs(previous):.3g} %" if previous else f"up from {previous:g}"
            what = (f"{up} on steps {p0}-{p1}'s {previous:.4g} "
                    f"(increase_threshold_percent {s.increase_threshold_percent:g})")
        else:
            what = f"not {s.diff_percent:g} % below steps {a0}-{a1}'s {old:.4g}"
        return Trigger("loss_not_decreasing", {"value": new, "earlier": old, "evidence": (
            f"loss_not_decreasing at step {observation.step}: the mean loss of steps {n0}-{n1} is {new:.4g}, {what}; "
            "try a higher learning rate (or check that a warm-up ends), check that labels match inputs and that "
            "the optimizer has the model's parameters, or stop a run that has converged")})

    def holding(self) -> bool:
        return self.stuck

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train.state_dict(), "means": [list(m) for m in self.means], "stuck": self.stuck}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state.get("train", {}))
        self.means = deque(((int(a), int(b), float(v)) for a, b, v in state.get("means", [])),
                           maxlen=self.spec.num_steps + 1)
        self.stuck = bool(state.get("stuck", False))


class OverfitDetector(Detector):
    """A fixed gap between validation and training loss is no sign of overfitting by itself (many healthy runs
    have one): it must be over ``ratio_threshold``, larger than at the validation before, and come with a falling
    training loss, at ``patience`` validations in a row."""

    inputs = frozenset({"step"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.train = _TrainingLoss(1 << 30)
        self.last: tuple[float, float] | None = None  # (gap, training mean) at the validation before
        self.streak = 0

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, StepObservation):
            return None
        self.train.add(observation.step, observation.values)
        val = _validation(observation.values)
        if val is None:
            return None
        train = self.train.since_validation()
        if train is None or train <= 0 or observation.step < self.spec.start_step:
            return None
        gap = (val - train) / train
        last, self.last = self.last, (gap, train)
        overfitting = last is not None and gap > self.spec.ratio_threshold and gap > last[0] and train < last[1]
        self.streak = self.streak + 1 if overfitting else 0
        if self.streak != self.spec.patience:
            return None
        return Trigger("overfit", {"value": gap, "val_loss": val, "train_loss": train, "evidence": (
            f"overfit at step {observation.step}: the validation loss {val:.4g} is {100 * gap:.3g} % above the "
            f"training loss {train:.4g} (ratio_threshold {100 * self.spec.ratio_threshold:g} %), the gap growing "
            f"while the training loss falls, {self.spec.patience} validation(s) in a row; try more data or "
            "augmentation, regularisation (weight decay, dropout), a smaller model, or early stopping")})

    def holding(self) -> bool:
        return self.streak >= self.spec.patience

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train.state_dict(), "last": list(self.last) if self.last else None,
                "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state.get("train", {}))
        last = state.get("last")
        self.last = (float(last[0]), float(last[1])) if last else None
        self.streak = int(state.get("streak", 0))


class OvertrainingDetector(Detector):
    """``delta`` is relative; ``patience_train`` counts training-loss intervals, ``patience_validation``
    validations. Fires once both have gone stale. A run that logs no validation loss is never judged: a
    training loss that stops improving alone is a plateau (loss_not_decreasing), not training past the point
    where the model generalises best."""

    inputs = frozenset({"step"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.train = _TrainingLoss(spec.interval)
        self.best_train: float | None = None
        self.best_val: float | None = None
        self.train_stale = self.val_stale = 0
        self.validations = 0
        self.fired = False

    @staticmethod
    def _better(value: float, best: float | None, delta: float) -> bool:
        return best is None or value < best - abs(best) * delta

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, StepObservation):
            return None
        s = self.spec
        closed = self.train.add(observation.step, observation.values)
        if closed is not None:
            if self._better(closed[2], self.best_train, s.delta):
                self.best_train, self.train_stale = closed[2], 0
            else:
                self.train_stale += 1
        val = _validation(observation.values)
        if val is not None:
            self.validations += 1
            if self._better(val, self.best_val, s.delta):
                self.best_val, self.val_stale = val, 0
            else:
                self.val_stale += 1
        stale = self.train_stale >= s.patience_train and self.validations > 0 and self.val_stale >= s.patience_validation
        was, self.fired = self.fired, stale
        if not stale or was:
            return None
        val_text = f" and the validation loss not for {self.val_stale} validation(s) (best {self.best_val:.4g})"
        return Trigger("overtraining", {"value": self.best_train, "evidence": (
            f"overtraining at step {observation.step}: the training loss has not improved by {100 * s.delta:g} % "
            f"for {self.train_stale} intervals of {s.interval} steps (best {self.best_train:.4g}){val_text}; "
            "try stopping (keep the best checkpoint), or a lower learning rate if it should still improve")})

    def holding(self) -> bool:
        return self.fired

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train.state_dict(), "best_train": self.best_train, "best_val": self.best_val,
                "train_stale": self.train_stale, "val_stale": self.val_stale, "validations": self.validations,
                "fired": self.fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state.get("train", {}))
        self.best_train = state.get("best_train")
        self.best_val = state.get("best_val")
        self.train_stale = int(state.get("train_stale", 0))
        self.val_stale = int(state.get("val_stale", 0))
        self.validations = int(state.get("validations", 0))
        self.fired = bool(state.get("fired", False))


#: step_outlier: the robust sigma of a normal distribution from its median absolute deviation
MAD_SIGMA = 1.4826
#: step_outlier: an outlier is also this many times the median and this many seconds over it (a loop steady to
#: the microsecond has a MAD of microseconds, and a 3-sigma step of it, or a millisecond lost to the scheduler
#: on a busy laptop, is no slow step worth a person's attention)
OUTLIER_FLOOR = 2.0
OUTLIER_MIN_EXTRA_SECONDS = 0.005
#: step_outlier: the steps the median needs before any is judged, and how often it is recomputed
OUTLIER_BASELINE = 50
OUTLIER_REFRESH = 25
#: step_outlier: this many equally spaced outliers are periodic (in-loop evaluation, checkpoints)
PERIODIC_RUN = 4
#: step_outlier: the outliers a period is looked for among
PERIODIC_MEMORY = 16


class StepOutlierDetector(Detector):
    """Robust statistics: the median and MAD of the last ``window`` step times that were not outliers (the
    first steps, slow while kernels are tuned and caches fill, only seed them), recomputed every
    ``OUTLIER_REFRESH`` steps. An outlier is above median + stddev x 1.4826 MAD, ``OUTLIER_FLOOR`` x the
    median and the median + ``OUTLIER_MIN_EXTRA_SECONDS``. ``PERIODIC_RUN`` equally spaced outliers among the last
    ``PERIODIC_MEMORY`` make a period: outliers on it are not counted, and the period is reported once (severity
    info). Fires when ``n_outliers`` outliers off the period fall in the last ``window`` steps; once per episode."""

    inputs = frozenset({"step"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.durations: deque[float] = deque(maxlen=spec.window)
        self.median: float | None = None
        self.sigma = 0.0
        self.since_refresh = 0
        self.outliers: deque[int] = deque()  # steps of the counted outliers, within the window
        self.recent: deque[int] = deque(maxlen=PERIODIC_MEMORY)  # steps of the last outliers, periodic or not
        self.period: list[int] | None = None  # [period, phase]
        self.firing = False

    def _refresh(self) -> None:
        values = list(self.durations)
        median = statistics.median(values)
        self.median, self.sigma = median, MAD_SIGMA * statistics.median(abs(v - median) for v in values)
        self.since_refresh = 0

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, StepObservation):
            return None
        duration = observation.values.get("step_duration_seconds")
        if duration is None or not math.isfinite(duration) or duration <= 0:
            return None
        step = observation.step
        while self.outliers and self.outliers[0] <= step - self.spec.window:
            self.outliers.popleft()
        stale = self.median is None or self.since_refresh >= OUTLIER_REFRESH
        if stale and len(self.durations) >= OUTLIER_BASELINE:
            self._refresh()
        median = self.median
        if median is None or duration <= self._limit(median):
            self.durations.append(duration)
            self.since_refresh += 1
            self._cleared()
            return None
        return self._outlier(step, duration, median)

    def _limit(self, median: float) -> float:
        return max(median + self.spec.stddev * self.sigma, OUTLIER_FLOOR * median, median + OUTLIER_MIN_EXTRA_SECONDS)

    def _cleared(self) -> None:
        if self.firing and len(self.outliers) < self.spec.n_outliers:
            self.firing = False
        return None

    def _outlier(self, step: int, duration: float, median: float) -> Trigger | None:
        self.recent.append(step)
        if self.period is not None and (step - self.period[1]) % self.period[0] == 0:
            self._cleared()
            return None
        recent = set(self.recent) if self.period is None else set()  # one period, reported once
        # a period: this step and PERIODIC_RUN - 1 before it, equally spaced, all outliers (random slow steps
        # between them do not hide it)
        period = next((step - r for r in sorted(recent, reverse=True) if step - r >= 2 and all(
            step - k * (step - r) in recent for k in range(2, PERIODIC_RUN))), None) if recent else None
        if period is not None:
            self.period = [period, step % period]
            self.outliers = deque(s for s in self.outliers if (s - step) % period)
            self._cleared()
            return Trigger("step_outlier_periodic", {"value": duration, "period": period, "severity": "info",
                                                     "evidence": (
                f"step_outlier at step {step}: every {period} steps a step is slow ({duration * 1e3:.4g} ms, the "
                f"median is {median * 1e3:.4g} ms): periodic work in the loop (an evaluation, a checkpoint, "
                "logging), not counted as outliers")})
        self.outliers.append(step)
        if self.firing or len(self.outliers) < self.spec.n_outliers:
            return None
        self.firing = True
        first = self.outliers[0]
        return Trigger("step_outlier", {"value": duration, "outliers": len(self.outliers), "median": median,
                                        "evidence": (
            f"step_outlier at step {step}: {len(self.outliers)} steps since step {first} took over "
            f"{self._limit(median) * 1e3:.4g} ms (median "
            f"{median * 1e3:.4g} ms + {self.spec.stddev:g} robust sigma; n_outliers {self.spec.n_outliers} within "
            f"{self.spec.window} steps), this one {duration * 1e3:.4g} ms; try: what else runs on the machine (a "
            "noisy neighbour, CPU throttling), garbage collection, data that is slow to load now and then, "
            "or a rank waiting on a straggler")})

    def holding(self) -> bool:
        return self.firing

    def state_dict(self) -> dict[str, Any]:
        return {"durations": list(self.durations), "median": self.median, "sigma": self.sigma,
                "since_refresh": self.since_refresh, "outliers": list(self.outliers), "recent": list(self.recent),
                "period": self.period, "firing": self.firing}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.durations = deque((float(v) for v in state.get("durations", [])), maxlen=self.spec.window)
        median = state.get("median")
        self.median = float(median) if median is not None else None
        self.sigma = float(state.get("sigma", 0.0))
        self.since_refresh = int(state.get("since_refresh", 0))
        self.outliers = deque(int(s) for s in state.get("outliers", []))
        self.recent = deque((int(s) for s in state.get("recent", [])), maxlen=PERIODIC_MEMORY)
        period = state.get("period")
        self.period = [int(period[0]), int(period[1])] if isinstance(period, list) and len(period) == 2 else None
        self.firing = bool(state.get("firing", False))


#: low_gpu_utilization: a reading counts while the run steps: its newest step at most this old (a stall, a long
#: evaluation or the time before the first step leave the GPU idle for reasons other rules name)
GPU_STEPPING_SECONDS = 60.0


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


class LowGpuUtilizationDetector(Detector):
    """Per GPU of the run, over its last ``window`` readings taken while the run steps; once per episode, held
    while a GPU stays so."""

    inputs = frozenset({"tick"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.readings: deque[list[float]] = deque(maxlen=spec.window)  # percent, one per GPU
        self.last_reading: float | None = None
        self.low = False

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, TickObservation):
            return None
        t, utilization = observation.gpu_reading_t, observation.gpu_utilization
        if (t is None or t == self.last_reading or not utilization or not all(map(math.isfinite, utilization))
                or observation.ended
                or observation.last_step_t is None or observation.now - observation.last_step_t > GPU_STEPPING_SECONDS):
            return None
        self.last_reading = t
        if self.readings and len(self.readings[-1]) != len(utilization):
            self.readings.clear()  # the run's GPUs changed (a rank came or went): a new window
        self.readings.append([100.0 * min(max(u, 0.0), 1.0) for u in utilization])
        if len(self.readings) < self.spec.window:
            return None
        found = None
        for gpu in range(len(utilization)):
            series = [r[gpu] for r in self.readings]
            p95, p5 = _percentile(series, 95.0), _percentile(series, 5.0)
            if p95 < self.spec.threshold_p95:
                found = (gpu, p95, p5, "under-used", f"p95 {p95:.0f} % < threshold_p95 {self.spec.threshold_p95:g} %",
                         "a larger batch, more DataLoader workers, fewer host-device syncs (.item(), .cpu()) in "
                         "the loop, or a smaller GPU")
                break
            if p5 < self.spec.threshold_p5:
                found = (gpu, p95, p5, "fluctuating",
                         f"p95 {p95:.0f} % but p5 {p5:.0f} % < threshold_p5 {self.spec.threshold_p5:g} %",
                         "the GPU waits in turns: on the input pipeline (prefetch, pin_memory, more workers), on "
                         "a collective or on a straggler rank")
                break
        was, self.low = self.low, found is not None
        if found is None or was:
            return None
        gpu, p95, p5, how, figure, advice = found
        return Trigger(f"low_gpu_utilization:{how}", {"value": p95, "p5": p5, "gpu": gpu, "evidence": (
            f"low_gpu_utilization at step {observation.step}: the run's GPU {gpu} is {how} over the last "
            f"{self.spec.window} readings ({figure}); try {advice}")})

    def holding(self) -> bool:
        return self.low

    def state_dict(self) -> dict[str, Any]:
        return {"readings": [list(r) for r in self.readings], "last_reading": self.last_reading, "low": self.low}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.readings = deque(([float(v) for v in r] for r in state.get("readings", [])), maxlen=self.spec.window)
        last = state.get("last_reading")
        self.last_reading = float(last) if last is not None else None
        self.low = bool(state.get("low", False))


class _ActivationRule(Detector):
    """A rule judged per activation module at each activation sample (step 1 and the layer samples' steps);
    fires when a module starts to break it (once per module and episode), holds while any does."""

    inputs: ClassVar[frozenset[str]] = frozenset({"activations"})
    reason: ClassVar[str]
    kinds: ClassVar[frozenset[str]]

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.offending: dict[str, int] = {}  # module -> the sampled step since which it breaks the rule

    def figure(self, record: ActivationsRecord, index: int) -> float:
        """The share (0..1) of the module's units that are idle."""
        raise NotImplementedError

    def evidence(self, record: ActivationsRecord, index: int, figure: float, since: int, others: int) -> str:
        raise NotImplementedError

    def observe(self, observation: Observation) -> Trigger | None:
        if not isinstance(observation, ActivationsRecord):
            return None
        record, step = observation, observation.step
        found: dict[str, tuple[int, float]] = {}
        for index, (module, kind) in enumerate(zip(record.modules, record.kinds, strict=False)):
            if kind in self.kinds and index < len(record.shares) and record.shares[index]:
                figure = self.figure(record, index)
                if 100.0 * figure > self.spec.threshold_layer:
                    found[module] = (index, figure)
        found = dict(sorted(found.items(), key=lambda item: -item[1][1]))
        new = [module for module in found if module not in self.offending]
        self.offending = {module: self.offending.get(module, step) for module in found}
        if not new:
            return None
        module = new[0]
        index, figure = found[module]
        feeder = record.feeders[index] if index < len(record.feeders) else ""
        text = self.evidence(record, index, figure, self.offending[module], len(found) - 1)
        return Trigger(self.reason, {"layer": module, "feeder": feeder, "value": 100.0 * figure,
                                     "layers": new[:SHOWN_LAYERS], "since": self.offending[module], "evidence": text})

    def holding(self) -> bool:
        return bool(self.offending)


def _unit_word(record: ActivationsRecord, index: int) -> str:
    units = record.units[index] if index < len(record.units) else 0
    return f"{units} units" if units else "units"


def _fed_by(record: ActivationsRecord, index: int) -> str:
    feeder = record.feeders[index] if index < len(record.feeders) else ""
    return f"`{feeder}`" if feeder else "the layer before it"


class DeadReluDetector(_ActivationRule):
    """A unit is a feature of a linear layer's output or a channel of a convolution's; its activity is the share
    of (sample, position) pairs of the sampled step's training forward passes where its input is positive."""

    reason = "dead_relu"
    kinds = frozenset({"relu"})

    def figure(self, record: ActivationsRecord, index: int) -> float:
        return record.share_below(index, self.spec.threshold_inactivity / 100.0)

    def evidence(self, record: ActivationsRecord, index: int, figure: float, since: int, others: int) -> str:
        return (f"dead_relu at step {record.step}: {100 * figure:.0f} % of `{record.modules[index]}`'s "
                f"{_unit_word(record, index)} active in < {self.spec.threshold_inactivity:g} % of samples"
                f"{_since(record.step, since)} (threshold_layer {self.spec.threshold_layer:g} %)"
                f"{_and_others(others)}; try a lower learning rate, LeakyReLU or GELU, or check the initialisation "
                f"(and the bias) of {_fed_by(record, index)}")


class SaturatedActivationDetector(_ActivationRule):
    """A tanh or sigmoid unit is saturated (inactive) when its input is beyond the bounds, where the gradient is
    under 1e-7, in more than ``threshold_inactivity`` % of its pairs: a healthy unit never gets there."""

    reason = "saturated_activation"
    kinds = frozenset({"tanh", "sigmoid"})

    def figure(self, record: ActivationsRecord, index: int) -> float:
        return record.share_above(index, self.spec.threshold_inactivity / 100.0)

    def evidence(self, record: ActivationsRecord, index: int, figure: float, since: int, others: int) -> str:
        kind = record.kinds[index]
        low, high = ((self.spec.threshold_tanh_min, self.spec.threshold_tanh_max) if kind == "tanh" else
                     (self.spec.threshold_sigmoid_min, self.spec.threshold_sigmoid_max))
        return (f"saturated_activation at step {record.step}: {100 * figure:.0f} % of `{record.modules[index]}`'s "
                f"{_unit_word(record, index)} ({kind}) have inputs outside [{low:g}, {high:g}] in over "
                f"{self.spec.threshold_inactivity:g} % of samples{_since(record.step, since)} (threshold_layer "
                f"{self.spec.threshold_layer:g} %){_and_others(others)}; try normalising the inputs of "
                f"{_fed_by(record, index)} (LayerNorm, BatchNorm), a smaller initialisation or learning rate, or a "
                "ReLU-like activation")


#: poor_weight_initialization: p95 - p5 of a zero-mean normal distribution is 3.29 sigma, and its mean absolute
#: value sigma x sqrt(2 / pi): the spread estimated from the layer sample's mean |gradient|
GRADIENT_SPREAD_PER_ABS_MEAN = 3.29 * math.sqrt(math.pi / 2)


class PoorWeightInitializationDetector(Detector):
    """(a) At the first ``steps`` activation samples (step 1 is one): the input variance of each activation
    module against the module of the same kind before it in the forward pass; PyTorch's default initialisation
    shrinks a ReLU MLP's variance about 6x a layer (so smdebug's max/min over all layers exceeds 10 in any
    healthy MLP over 3 layers deep): a jump between neighbours over ``threshold`` is a layer initialised at
    another scale. (b) At the first ``steps`` layer samples: every feeding layer's gradient spread under
    ``distribution_range`` while the loss (its mean between layer samples) has not decreased within
    ``patience`` samples: gradients too narrow to learn. Fires once."""

    inputs = frozenset({"activations", "layers", "step"})

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.activation_samples = 0
        self.layer_samples = 0
        self.feeders: list[str] = []
        self.loss_total, self.loss_count = 0.0, 0
        self.means: list[float] = []  # the loss's mean between layer samples
        self.fired = False

    def observe(self, observation: Observation) -> Trigger | None:
        if self.fired:
            return None
        if isinstance(observation, StepObservation):
            loss = observation.values.get("loss")
            if loss is not None and math.isfinite(loss):
                self.loss_total += loss
                self.loss_count += 1
            return None
        if isinstance(observation, ActivationsRecord):
            self.activation_samples += 1
            self.feeders = sorted({f for f in observation.feeders if f})[:1000]
            return self._variance(observation) if self.activation_samples <= self.spec.steps else None
        if isinstance(observation, LayersRecord) and not observation.trigger:
            self.layer_samples += 1
            if self.loss_count:
                self.means.append(self.loss_total / self.loss_count)
                self.loss_total, self.loss_count = 0.0, 0
            return self._narrow(observation) if self.layer_samples <= self.spec.steps else None
        return None

    def _variance(self, record: ActivationsRecord) -> Trigger | None:
        before: dict[str, tuple[str, float]] = {}  # kind -> the last module of that kind and its input variance
        worst: tuple[float, int, str, float, float] | None = None
        for index, (module, kind) in enumerate(zip(record.modules, record.kinds, strict=False)):
            var = record.input_var[index] if index < len(record.input_var) else None
            if var is None or not math.isfinite(var) or var <= 0:
                continue
            if kind in before:
                previous, previous_var = before[kind]
                ratio = max(var, previous_var) / min(var, previous_var)
                if ratio > self.spec.threshold and (worst is None or ratio > worst[0]):
                    worst = (ratio, index, previous, previous_var, var)
            before[kind] = (module, var)
        if worst is None:
            return None
        self.fired = True
        ratio, index, previous, previous_var, var = worst
        module = record.modules[index]
        return Trigger("poor_weight_initialization", {"layer": module, "feeder": record.feeders[index]
                                                      if index < len(record.feeders) else "", "value": ratio,
                                                      "evidence": (
            f"poor_weight_initialization at step {record.step}: the input variance of `{module}` is {var:.3g}, "
            f"{ratio:.3g}x that of `{previous}` before it ({previous_var:.3g}; threshold {self.spec.threshold:g}); "
            f"try: check the initialisation of {_fed_by(record, index)} (its scale, a custom init that "
            "multiplies), or PyTorch's default / kaiming initialisation")})

    def _narrow(self, record: LayersRecord) -> Trigger | None:
        means = self.means
        patience = self.spec.patience
        if len(means) <= patience or min(means[-patience:]) < min(means[:-patience]):
            return None  # too soon to say, or the loss decreased within patience
        feeders = set(self.feeders)
        spreads = {name: GRADIENT_SPREAD_PER_ABS_MEAN * v for name, v in _finite(record.layers,
                                                                                record.grad_abs_mean).items()
                   if name in feeders}
        if not spreads or max(spreads.values()) >= self.spec.distribution_range:
            return None
        self.fired = True
        widest = max(spreads, key=spreads.__getitem__)
        return Trigger("poor_weight_initialization:narrow_gradients", {"layer": widest, "value": spreads[widest],
                                                                       "evidence": (
            f"poor_weight_initialization at step {record.step}: the gradients of every weight matrix are narrow "
            f"(p95 - p5 at most {spreads[widest]:.3g}, at `{widest}`; distribution_range "
            f"{self.spec.distribution_range:g}) and the loss has not decreased in {patience} samples; try a "
            "larger initialisation (PyTorch's default, kaiming) or a higher learning rate")})

    def holding(self) -> bool:
        return False


CATALOGUE_DETECTORS: dict[type[Any], Callable[[Any], Detector]] = {
    spec.VanishingGradient: VanishingGradientDetector, spec.ExplodingTensor: ExplodingTensorDetector,
    spec.WeightUpdateRatio: WeightUpdateRatioDetector, spec.AllZero: AllZeroDetector,
    spec.InputBound: InputBoundDetector, spec.LossNotDecreasing: LossNotDecreasingDetector,
    spec.Overfit: OverfitDetector, spec.Overtraining: OvertrainingDetector,
    spec.UnchangedTensor: UnchangedTensorDetector, spec.GpuMemoryIncrease: GpuMemoryIncreaseDetector,
    spec.StalledTraining: StalledTrainingDetector, spec.MaxInitializationTime: MaxInitializationTimeDetector,
    spec.StepOutlier: StepOutlierDetector, spec.LowGpuUtilization: LowGpuUtilizationDetector,
    spec.DeadRelu: DeadReluDetector, spec.SaturatedActivation: SaturatedActivationDetector,
    spec.PoorWeightInitialization: PoorWeightInitializationDetector,
}
