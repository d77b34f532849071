"""The learning-rate arithmetic of a ``reduce_lr`` action, exactly as torch's ReduceLROnPlateau does it."""

from __future__ import annotations

from collections.abc import Sequence


def min_lr_for(min_lr: float | Sequence[float], group: int) -> float:
    """A scalar min_lr applies to every group; a list gives one per group (the last one repeats)."""
    if isinstance(min_lr, (int, float)):
        return float(min_lr)
    return float(min_lr[min(group, len(min_lr) - 1)]) if len(min_lr) else 0.0


def reduced_lr(lr: float, factor: float, min_lr: float, eps: float) -> float:
    """``max(lr * factor, min_lr)``, or ``lr`` unchanged when that is a change of ``eps`` or less."""
    new_lr = max(lr * factor, min_lr)
    return new_lr if lr - new_lr > eps else lr
