"""The catalogue's rules files spelling: Amazon SageMaker Debugger's rule names, parameter names and defaults.

A catalogue rule is a detector type named after the rule, its input implied by the type (no ``metric:``), its
parameters beside it: ``- {name: vanishing, detect: {type: vanishing_gradient, threshold: 1.0e-7}}``. What each
computes, from which samples, and where it differs from smdebug: docs/rules.md, "The catalogue"; the detectors are
rules/catalogue.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gradwatch.rules.spec_base import SpecModel


class VanishingGradient(SpecModel):
    """A layer's mean absolute gradient is below ``threshold`` while another layer's is 1000x larger."""

    type: Literal["vanishing_gradient"]
    threshold: float = Field(1e-7, gt=0)


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


CatalogueSpecs = VanishingGradient | ExplodingTensor | WeightUpdateRatio | AllZero | InputBound
CATALOGUE_SPECS: tuple[type[SpecModel], ...] = (VanishingGradient, ExplodingTensor, WeightUpdateRatio, AllZero,
                                                InputBound)

#: what each catalogue rule reads, shown where a rule's metric is (decisions, alerts, `rules check`)
IMPLIED_METRICS = {"vanishing_gradient": "layer_grad_abs_mean", "exploding_tensor": "loss,grad_norm",
                   "weight_update_ratio": "layer_update_ratio", "all_zero": "layer_grad_zero_fraction",
                   "input_bound": "data_wait_fraction"}


def implied_metric(detect_type: object) -> str | None:
    """The input a catalogue detector type reads; None for the other detectors (their rule names a metric)."""
    return IMPLIED_METRICS.get(detect_type) if isinstance(detect_type, str) else None
