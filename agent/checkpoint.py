"""Save and restore the agent's state together with its read offsets, atomically.

Offsets and the state they produced are saved in one file, so after a restart (even after
SIGKILL) the agent resumes from a consistent point: nothing lost, nothing counted twice.

The file is one JSON object, but it is not encoded whole each time (``CheckpointWriter``): each run's part
(its ranks, its rules' state) is encoded when the run changed since the last save, and the text of the others
is reused, so that a save costs what changed, not the number of idle runs kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from gradwatch.agent.state import AgentState, RankState
from gradwatch.spool.writer import write_text_atomic

log = logging.getLogger("gradwatch.agent")
CHECKPOINT_VERSION = 1


class Part(Protocol):
    """Something else the agent keeps across restarts (e.g. the firing alerts), saved under its own key."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def save_checkpoint(path: Path, state: AgentState, parts: Mapping[str, Part] | None = None) -> None:
    """One save, everything encoded (tools and tests; the agent keeps a CheckpointWriter)."""
    CheckpointWriter().save(path, state, parts)


def _rank_signature(s: RankState) -> tuple[Any, ...]:
    """What changes whenever a rank's saved state does: every record moves the offset; what a scan or the
    state's refresh changes without a record is here too. (Fields left out, such as when a partial line was
    first seen, are judged again after a restart.)"""
    return (s.offset, s.records_inode, s.meta_stamp, s.status, s.ended_at, s.history_until, s.in_long_line,
            s.resumes)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


class CheckpointWriter:
    """Saves checkpoints, re-encoding only the runs that changed since its last save."""

    def __init__(self) -> None:
        self._runs: dict[str, tuple[tuple[Any, ...], str, str | None]] = {}  # run -> (signature, ranks, rules)
        self._saved_rules: dict[str, tuple[object, str]] = {}  # rules' state of runs not seen since the start
        self.encoded_last = 0  # runs encoded by the last save (the rest were reused)

    def save(self, path: Path, state: AgentState, parts: Mapping[str, Part] | None = None) -> None:
        runs: list[str] = []
        rules: list[str] = []
        encoded = 0
        with state.lock:
            reloads = state.rules.reloads.get("ok", 0)
            for run, ranks in state.runs.items():
                run_rules = state.rules.runs.get(run)
                signature = (reloads, run_rules is not None, *(_rank_signature(s) for s in ranks.values()))
                cached = self._runs.get(run)
                if cached is None or cached[0] != signature:
                    cached = self._runs[run] = (signature, _dumps({str(r): s.state_dict() for r, s in ranks.items()}),
                                                _dumps(run_rules.state_dict()) if run_rules is not None else None)
                    encoded += 1
                key = _dumps(run)
                runs.append(f"{key}:{cached[1]}")
                if cached[2] is not None:
                    rules.append(f"{key}:{cached[2]}")
            for run, run_rules in state.rules.runs.items():
                if run not in state.runs:  # (not expected: a run's rules go with it)
                    rules.append(f"{_dumps(run)}:{_dumps(run_rules.state_dict())}")
            saved_rules = state.rules.saved_states()
            for run, saved in saved_rules.items():
                known = self._saved_rules.get(run)
                if known is None or known[0] is not saved:  # never changed in place: replaced or popped
                    known = self._saved_rules[run] = (saved, _dumps(saved))
                rules.append(f"{_dumps(run)}:{known[1]}")
            retired = _dumps({run: tomb.to_json() for run, tomb in sorted(state.retired.items())})
            saved_parts = _dumps({name: part.state_dict() for name, part in (parts or {}).items()})
            for run in [r for r in self._runs if r not in state.runs]:
                del self._runs[run]
            for run in [r for r in self._saved_rules if r not in saved_rules]:
                del self._saved_rules[run]
        self.encoded_last = encoded
        text = (f'{{"version":{CHECKPOINT_VERSION},"saved_at":{time.time()!r},"runs":{{{",".join(runs)}}},'
                f'"retired":{retired},"rules":{{{",".join(rules)}}},"parts":{saved_parts}}}')
        write_text_atomic(path, text)


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
