"""The catalogue's rules files spelling: Amazon SageMaker Debugger's rule names, parameter names and defaults.

A catalogue rule is a detector type named after the rule, its input implied by the type (no ``metric:``), its
parameters beside it: ``- {name: vanishing, detect: {type: vanishing_gradient, threshold: 1.0e-7}}``. What each
computes, from which samples, and where it differs from smdebug: docs/rules.md, "The catalogue"; the detectors are
rules/catalogue.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gradwatch.rules.spec_base import SpecModel


class VanishingGradient(SpecModel):
    """A layer's mean absolute gradient is below ``threshold`` while another layer's is 1000x larger."""

    type: Literal["vanishing_gradient"]
    threshold: float = Field(1e-7, gt=0)


class UnchangedTensor(SpecModel):
    """A layer's weights unchanged (update/weight ratio at most ``rtol``) at ``num_steps`` samples in a row while
    the learning rate is not 0: frozen by accident."""

    type: Literal["unchanged_tensor"]
    num_steps: int = Field(3, ge=1, le=10_000)
    rtol: float = Field(1e-5, ge=0)
    atol: float = Field(1e-8, ge=0)


class ExplodingTensor(SpecModel):
    """The loss or the gradients are NaN (or, unless ``only_nan``, infinite)."""

    type: Literal["exploding_tensor"]
    only_nan: bool = False


class WeightUpdateRatio(SpecModel):
    """A layer's update/weight ratio ``||dw|| / (||w|| + epsilon)`` is above ``large_threshold`` or below
    ``small_threshold`` (while the learning rate is not 0)."""

    type: Literal["weight_update_ratio"]
    large_threshold: float = Field(10.0, gt=0)
    small_threshold: float = Field(1e-8, ge=0)
    epsilon: float = Field(1e-9, ge=0)


class AllZero(SpecModel):
    """At least ``threshold`` percent of a layer's gradients are exactly zero, at two samples in a row."""

    type: Literal["all_zero"]
    threshold: float = Field(100.0, gt=0, le=100)


class InputBound(SpecModel):
    """The data wait is over ``threshold`` percent of the step time (median over ``window`` steps)."""

    type: Literal["input_bound"]
    threshold: float = Field(50.0, gt=0, lt=100)
    window: int = Field(100, ge=5, le=100_000)


class LossNotDecreasing(SpecModel):
    """The mean training loss of an ``interval`` of steps is not ``diff_percent`` below the mean ``num_steps``
    intervals before, or ``increase_threshold_percent`` above the interval before."""

    type: Literal["loss_not_decreasing"]
    num_steps: int = Field(10, ge=1, le=10_000)
    diff_percent: float = Field(0.1, ge=0, le=100)
    increase_threshold_percent: float = Field(5.0, ge=0)
    interval: int = Field(100, ge=1, le=1_000_000)  # ours: steps per training-loss sample


class Overfit(SpecModel):
    """At ``patience`` validations in a row: (val - train) / train over ``ratio_threshold`` and growing, while
    the training loss (its mean since the validation before) falls."""

    type: Literal["overfit"]
    start_step: int = Field(0, ge=0)
    patience: int = Field(1, ge=1, le=10_000)
    ratio_threshold: float = Field(0.1, ge=0)


class Overtraining(SpecModel):
    """Neither the training loss (interval means) improved by ``delta`` (relative) within ``patience_train``
    intervals nor the validation loss within ``patience_validation`` validations (a run with validations)."""

    type: Literal["overtraining"]
    patience_train: int = Field(5, ge=1, le=10_000)
    patience_validation: int = Field(10, ge=1, le=10_000)
    delta: float = Field(0.01, ge=0, lt=1)
    interval: int = Field(100, ge=1, le=1_000_000)  # ours: steps per training-loss sample


class GpuMemoryIncrease(SpecModel):
    """The CUDA allocator's reserved memory grew at each of ``window`` readings in a row (about one a second),
    by more than ``increase`` percent in all."""

    type: Literal["gpu_memory_increase"]
    increase: float = Field(5.0, gt=0)
    window: int = Field(10, ge=2, le=10_000)


class StalledTraining(SpecModel):
    """No optimizer step for ``threshold`` seconds while the run goes on (its process not ended)."""

    type: Literal["stalled_training"]
    threshold: float = Field(1800.0, gt=0)


class MaxInitializationTime(SpecModel):
    """No first step ``threshold`` minutes after the process started."""

    type: Literal["max_initialization_time"]
    threshold: float = Field(20.0, gt=0)


class StepOutlier(SpecModel):
    """At least ``n_outliers`` step times within the last ``window`` steps above median + ``stddev`` robust
    sigmas (1.4826 x the median absolute deviation) of the steps before, outliers excluded; steps slow on a
    fixed period (in-loop evaluation, checkpoints) are reported once, at info level, and not counted."""

    type: Literal["step_outlier"]
    stddev: float = Field(3.0, gt=0)
    n_outliers: int = Field(10, ge=1, le=100_000)
    window: int = Field(500, ge=50, le=100_000)  # ours: steps over which outliers are counted and the median taken


class LowGpuUtilization(SpecModel):
    """Over the last ``window`` GPU readings (about one a second) taken while the run steps: a GPU of the run
    with p95 utilisation under ``threshold_p95`` (under-used), or over it with p5 under ``threshold_p5``
    (fluctuating: the GPU waits on something in turns)."""

    type: Literal["low_gpu_utilization"]
    threshold_p95: float = Field(70.0, gt=0, le=100)
    threshold_p5: float = Field(10.0, ge=0, le=100)
    window: int = Field(500, ge=10, le=100_000)


class DeadRelu(SpecModel):
    """More than ``threshold_layer`` percent of a ReLU module's units are active (a positive input) in fewer
    than ``threshold_inactivity`` percent of their (sample, position) pairs, at an activation sample."""

    type: Literal["dead_relu"]
    threshold_inactivity: float = Field(1.0, ge=0, le=100)
    threshold_layer: float = Field(50.0, ge=0, lt=100)


#: smdebug's saturation bounds, which the probe counts at (probes/activations.py)
SATURATION_BOUNDS = {"threshold_tanh_min": -9.4999, "threshold_tanh_max": 9.4999, "threshold_sigmoid_min": -23.0,
                     "threshold_sigmoid_max": 16.99999}


class SaturatedActivation(SpecModel):
    """More than ``threshold_layer`` percent of a tanh or sigmoid module's units have their input beyond the
    bounds (a gradient under 1e-7) in more than ``threshold_inactivity`` percent of their pairs."""

    type: Literal["saturated_activation"]
    threshold_tanh_min: float = -9.4999
    threshold_tanh_max: float = 9.4999
    threshold_sigmoid_min: float = -23.0
    threshold_sigmoid_max: float = 16.99999
    threshold_inactivity: float = Field(1.0, ge=0, le=100)
    threshold_layer: float = Field(50.0, ge=0, lt=100)

    @model_validator(mode="after")
    def _the_probes_bounds(self) -> SaturatedActivation:
        other = {k: getattr(self, k) for k, v in SATURATION_BOUNDS.items() if getattr(self, k) != v}
        if other:
            raise ValueError(f"{', '.join(other)}: the probe counts saturated inputs at smdebug's bounds (tanh "
                             "-9.4999 / 9.4999, sigmoid -23 / 16.99999, where the float32 gradient is under 1e-7); "
                             "other bounds are not supported: leave these parameters out")
        return self


class PoorWeightInitialization(SpecModel):
    """Within the first ``steps`` activation samples: the variance of an activation's input over that of the
    activation of its kind before it (or the inverse) above ``threshold``; or, within the first ``steps`` layer
    samples, every weight matrix's gradient spread (p95 - p5, estimated) under ``distribution_range`` while
    the training loss has not decreased within ``patience`` samples."""

    type: Literal["poor_weight_initialization"]
    threshold: float = Field(10.0, gt=1)
    distribution_range: float = Field(0.001, ge=0)
    patience: int = Field(5, ge=1, le=10_000)
    steps: int = Field(10, ge=1, le=10_000)


CatalogueSpecs = (VanishingGradient | ExplodingTensor | WeightUpdateRatio | AllZero | InputBound | LossNotDecreasing
                  | Overfit | Overtraining | UnchangedTensor | GpuMemoryIncrease | StalledTraining | MaxInitializationTime
                  | StepOutlier | LowGpuUtilization | DeadRelu | SaturatedActivation | PoorWeightInitialization)
CATALOGUE_SPECS: tuple[type[SpecModel], ...] = (VanishingGradient, ExplodingTensor, WeightUpdateRatio, AllZero,
                                                InputBound, LossNotDecreasing, Overfit, Overtraining, UnchangedTensor,
                                                GpuMemoryIncrease, StalledTraining, MaxInitializationTime,
                                                StepOutlier, LowGpuUtilization, DeadRelu, SaturatedActivation,
                                                PoorWeightInitialization)

#: what each catalogue rule reads, shown where a rule's metric is (decisions, alerts, `rules check`)
IMPLIED_METRICS = {"vanishing_gradient": "layer_grad_abs_mean", "exploding_tensor": "loss,grad_norm",
                   "weight_update_ratio": "layer_update_ratio", "all_zero": "layer_grad_zero_fraction",
                   "input_bound": "data_wait_fraction", "loss_not_decreasing": "loss", "overfit": "loss,val_loss",
                   "overtraining": "loss,val_loss", "unchanged_tensor": "layer_update_ratio",
                   "gpu_memory_increase": "cuda_memory_reserved_bytes", "stalled_training": "last_step_time",
                   "max_initialization_time": "first_step_time", "step_outlier": "step_duration_seconds",
                   "low_gpu_utilization": "gpu_utilization_ratio", "dead_relu": "activation_active_share",
                   "saturated_activation": "activation_saturated_share",
                   "poor_weight_initialization": "activation_input_variance,layer_grad_abs_mean,loss"}


def implied_metric(detect_type: object) -> str | None:
    """The input a catalogue detector type reads; None for the other detectors (their rule names a metric)."""
    return IMPLIED_METRICS.get(detect_type) if isinstance(detect_type, str) else None


def catalogue_types() -> list[str]:
    """The catalogue's detector types (smdebug's rule names), in the order above."""
    return [model.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]  # Literal["name"]
            for model in CATALOGUE_SPECS]


def catalogue_rules_text() -> str:
    """A rules file of the whole catalogue at smdebug's defaults, each rule named after its type, observing:
    what ``gradwatch inspect`` runs over a recorded run."""
    lines = ["rules:"] + [f"  - {{name: {kind}, detect: {{type: {kind}}}, alert: none}}" for kind in catalogue_types()]
    return "\n".join(lines) + "\n"
