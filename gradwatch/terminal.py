"""Text from the spool made safe for a terminal: run names, metric names, errors and alert texts come from
files any process of the user (or a crash mid-write) may have written. Control characters (an escape
sequence can rewrite the screen, retitle the window or hide a line) and bidirectional overrides are
shown as escapes, and rich's markup brackets are escaped so that ``[red]`` in a run name stays text."""

from __future__ import annotations

import re
from typing import Any

from rich.markup import escape

_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``) and rich markup neutralised."""
    return escape(_UNPRINTABLE.sub(_escape_char, text))


def safe(value: Any) -> Any:
    """``value`` (the JSON of /api/runs) with every string in it, keys too, made safe by safe_text()."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe(k): safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [safe(v) for v in value]
    return value
