"""The recent-maximum gauge the agent keeps per series (the spike statistics live in gradwatch.rules.detectors)."""

from __future__ import annotations

import math
from collections import deque

BUCKETS = 60  # per window: the window's edge is resolved to window / BUCKETS


class RecentMax:
    """Maximum over the trailing ``window`` seconds, so a spike between two scrapes still shows.

    The maximum of each slice of ``window / BUCKETS`` seconds is kept, so memory is at most BUCKETS
    pairs whatever the step rate (a falling loss at 20 steps/s would otherwise keep every value of the
    window). The window's edge is accurate to one slice. Non-finite values are counted elsewhere and
    ignored here.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self.slice = window / BUCKETS
        self._items: deque[list[float]] = deque()  # [slice start, max in the slice], oldest first

    def add(self, t: float, value: float) -> None:
        if not math.isfinite(value):
            return
        start = t - t % self.slice
        items = self._items
        if items and items[-1][0] == start:
            if value > items[-1][1]:
                items[-1][1] = value
        elif not items or start > items[-1][0]:
            items.append([start, value])
            self._expire(t)
        else:  # an older slice (records of ranks read out of order): merged into the newest one
            items[-1][1] = max(items[-1][1], value)

    def value(self, now: float) -> float | None:
        self._expire(now)
        return max(v for _, v in self._items) if self._items else None

    def _expire(self, now: float) -> None:
        items = self._items
        while items and items[0][0] + self.slice < now - self.window:
            items.popleft()

    def state_dict(self) -> list[list[float]]:
        return [[t, v] for t, v in self._items]

    def load_state_dict(self, state: list[list[float]]) -> None:
        self._items = deque()
        for t, v in state:  # also the per-value pairs an older agent saved
            self.add(float(t), float(v))
