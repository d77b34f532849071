"""Save and restore the agent's state together with its read offsets, atomically.

Offsets and the state they produced are saved in one file, so after a restart (even after
SIGKILL) the agent resumes from a consistent point: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from gradwatch.agent.state import AgentState
from gradwatch.spool.writer import write_json_atomic

log = logging.getLogger("gradwatch.agent")
CHECKPOINT_VERSION = 1


class Part(Protocol):
    """Something else the agent keeps across restarts (e.g. the firing alerts), saved under its own key."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def save_checkpoint(path: Path, state: AgentState, parts: Mapping[str, Part] | None = None) -> None:
    with state.lock:
        payload: dict[str, Any] = {"version": CHECKPOINT_VERSION, "saved_at": time.time(), **state.state_dict()}
        payload["parts"] = {name: part.state_dict() for name, part in (parts or {}).items()}
    write_json_atomic(path, payload)


def load_checkpoint(path: Path, state: AgentState, parts: Mapping[str, Part] | None = None) -> bool:
    """Restore ``state`` (and ``parts``) from ``path``; False (and a fresh start from offset 0) when absent
    or unusable."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        _set_aside(path, f"unreadable ({exc})")
        return False
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        _set_aside(path, f"version {payload.get('version') if isinstance(payload, dict) else '?'} is not "
                         f"{CHECKPOINT_VERSION}")
        return False
    try:
        with state.lock:
            state.load_state_dict(payload)
            for name, part in (parts or {}).items():
                if name in payload.get("parts", {}):
                    part.load_state_dict(payload["parts"][name])
    except (KeyError, TypeError, ValueError) as exc:
        with state.lock:
            state.load_state_dict({})
        _set_aside(path, f"inconsistent ({exc!r})")
        return False
    return True


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_suffix(".unusable.json")
    log.warning("agent checkpoint %s is %s; moved to %s and re-reading the spool from the start", path, why, aside)
    with contextlib.suppress(OSError):
        path.replace(aside)
