"""Report each distinct problem of ours once per probe; later occurrences are only counted."""

from __future__ import annotations

import logging

log = logging.getLogger("gradwatch")


class WarnOnce:
    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, message: str, *args: object) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.warning("gradwatch: " + message, *args)
