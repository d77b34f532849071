"""The exponentially weighted z-score of a metric: the spike statistics the agent exports and the probe's
spike guards use. Pure Python, no pydantic: the probe imports it.
"""

from __future__ import annotations

import math
from typing import Any


class EmaZScore:
    """Flags upward spikes by z-score against an exponential moving mean and variance.

    The first ``warmup`` finite values only build the statistics (population mean/variance).
    After that a value with ``z > threshold`` is a spike and is kept out of the statistics.
    After ``readapt_after`` spikes in a row the level has truly moved (e.g. a new learning
    rate): the statistics restart from the new level.
    """

    def __init__(self, *, alpha: float = 0.02, threshold: float = 6.0, warmup: int = 20,
                 readapt_after: int = 20) -> None:
        self.alpha = alpha
        self.threshold = threshold
        self.warmup = warmup
        self.readapt_after = readapt_after
        self.count = 0
        self.mean = 0.0
        self.var = 0.0
        self.in_a_row = 0

    def zscore(self, value: float) -> float | None:
        """The z-score of ``value`` against the statistics, None during warm-up."""
        if self.count < self.warmup:
            return None
        floor = 1e-3 * abs(self.mean) + 1e-12  # a flat history must not make every wiggle a spike
        return (value - self.mean) / max(math.sqrt(self.var), floor)

    def update(self, value: float) -> bool:
        """Feed one value; True when it is a spike. Non-finite values are ignored."""
        if not math.isfinite(value):
            return False
        if self.count < self.warmup:
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.var += (delta * (value - self.mean) - self.var) / self.count
            return False
        z = self.zscore(value)
        if z is not None and z > self.threshold:
            self.in_a_row += 1
            if self.in_a_row >= self.readapt_after:
                self.count, self.mean, self.var, self.in_a_row = 0, 0.0, 0.0, 0
            return True
        self.in_a_row = 0
        delta = value - self.mean
        self.mean += self.alpha * delta
        self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "var": self.var, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.mean = float(state.get("mean", 0.0))
        self.var = float(state.get("var", 0.0))
        self.in_a_row = int(state.get("in_a_row", 0))


