"""Online statistics the agent keeps per series. Outliers and non-finite values never enter them."""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class SpikeDetector:
    """Flags upward spikes by z-score against an exponential moving mean and variance.

    The first ``warmup`` finite values only build the statistics. After that, a value with
    ``z > threshold`` is a spike and is kept out of the statistics, so one spike or NaN cannot
    poison them. After ``readapt_after`` spikes in a row the level has truly moved (e.g. a new
    learning rate): the statistics restart from the new level.
    """

    def __init__(self, *, alpha: float = 0.02, threshold: float = 6.0, warmup: int = 20, readapt_after: int = 20) -> None:
        self.alpha = alpha
        self.threshold = threshold
        self.warmup = warmup
        self.readapt_after = readapt_after
        self.count = 0
        self.mean = 0.0
        self.var = 0.0
        self.in_a_row = 0

    def update(self, value: float) -> bool:
        """Feed one value; True when it is a spike."""
        if not math.isfinite(value):
            return False
        if self.count < self.warmup:
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.var += (delta * (value - self.mean) - self.var) / self.count  # population variance
            return False
        std = math.sqrt(self.var)
        floor = 1e-3 * abs(self.mean) + 1e-12  # a flat history must not make every wiggle a spike
        if (value - self.mean) / max(std, floor) > self.threshold:
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


class RecentMax:
    """Maximum over the trailing ``window`` seconds, so a spike between two scrapes still shows.

    A monotonic deque: memory is bounded by the number of values inside the window.
    Non-finite values are counted elsewhere and ignored here.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._items: deque[tuple[float, float]] = deque()

    def add(self, t: float, value: float) -> None:
        if not math.isfinite(value):
            return
        while self._items and self._items[-1][1] <= value:
            self._items.pop()
        self._items.append((t, value))
        self._expire(t)

    def value(self, now: float) -> float | None:
        self._expire(now)
        return self._items[0][1] if self._items else None

    def _expire(self, now: float) -> None:
        while self._items and self._items[0][0] < now - self.window:
            self._items.popleft()

    def state_dict(self) -> list[list[float]]:
        return [[t, v] for t, v in self._items]

    def load_state_dict(self, state: list[list[float]]) -> None:
        self._items = deque((float(t), float(v)) for t, v in state)
