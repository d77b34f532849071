"""The recent-maximum gauge the agent keeps per series (the spike statistics live in gradwatch.rules.detectors)."""

from __future__ import annotations

import math
from collections import deque


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
