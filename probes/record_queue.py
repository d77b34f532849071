"""The bounded queue between the training thread and the writer thread: appending never blocks; a full
queue drops the record and counts it (the count reaches the agent in the next record written)."""

from __future__ import annotations

from collections import deque

from gradwatch.probes.captures import Capture
from gradwatch.probes.warn_once import WarnOnce


class RecordQueue:
    __slots__ = ("_warn", "dropped", "items", "max_items")

    def __init__(self, max_items: int, warn: WarnOnce) -> None:
        self.items: deque[Capture] = deque()  # the writer thread pops from the left
        self.max_items = max_items
        self.dropped = 0
        self._warn = warn

    def put(self, item: Capture) -> None:
        """Append, or drop and count when full (training thread; deque appends are atomic)."""
        if len(self.items) < self.max_items:
            self.items.append(item)
            return
        self.dropped += 1
        self._warn("queue-full", "record queue full (%d); records are dropped and counted, training goes on",
                   self.max_items)

    def __len__(self) -> int:
        return len(self.items)
