"""The clip-threshold arithmetic of a ``scale_clip`` action: one definition for every place that clips."""

from __future__ import annotations


def scaled_threshold(current: float, factor: float, low: float, high: float) -> float:
    """``current * factor``, kept within ``[low, high]`` (the action's ``min_max_norm``, ``max_max_norm``)."""
    return min(high, max(low, current * factor))
