"""Reading side of the spool, used by the agent (and by ``gradwatch status`` without an agent)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.spool.format import FORMAT_NAME, FORMAT_VERSION, parse_major

SUPPORTED_MAJOR = parse_major(FORMAT_VERSION)
DEFAULT_MAX_BYTES = 8 * 1024 * 1024


class SpoolFormatError(Exception):
    """A spool file this agent cannot use; the message says which file and what to do."""


@dataclass
class ReadResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0  # just past the last complete line consumed
    rejected: list[str] = field(default_factory=list)  # one reason per rejected line


def read_meta(path: Path) -> dict[str, Any]:
    """Load and check a ``rank-<r>.meta.json``; raise SpoolFormatError with a clear message."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpoolFormatError(f"{path}: cannot read run metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise SpoolFormatError(f"{path}: not gradwatch run metadata (field 'format' must be {FORMAT_NAME!r})")
    version = str(meta.get("format_version", ""))
    major = parse_major(version)
    if major is None:
        raise SpoolFormatError(f"{path}: field 'format_version' is {version!r}, expected 'MAJOR.MINOR'")
    if major > (SUPPORTED_MAJOR or 0):
        raise SpoolFormatError(
            f"{path}: spool format {version} is newer than this agent understands "
            f"({FORMAT_VERSION}); upgrade gradwatch on the agent side (pip install -U gradwatch)"
        )
    for key, kind in (("run", str), ("rank", int), ("world_size", int)):
        if not isinstance(meta.get(key), kind):
            raise SpoolFormatError(f"{path}: field {key!r} missing or not {kind.__name__}")
    return meta


def check_record(obj: Any) -> str | None:
    """Why a decoded line is not a valid record, or None when it is."""
    if not isinstance(obj, dict):
        return "not an object"
    if not isinstance(obj.get("kind"), str):
        return "field 'kind' missing or not a string"  # an unknown kind is from a newer minor version: skipped
    if not isinstance(obj.get("step"), int) or obj["step"] < 0:
        return "field 'step' missing or not a non-negative integer"
    if not isinstance(obj.get("t"), (int, float)):
        return "field 't' missing or not a number"
    return None


def read_ids(path: Path, only_lines_with: bytes = b"") -> set[str]:
    """The ``id`` fields of a JSON-lines file (commands, events, or the ack records of a records file
    when ``only_lines_with`` is ``b'"kind":"ack"'``). A missing file has none; bad lines are skipped."""
    ids: set[str] = set()
    try:
        with open(path, "rb") as f:
            for line in f:
                if only_lines_with not in line:
                    continue
                try:
                    ids.add(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return ids


def read_records(path: Path, offset: int, max_bytes: int = DEFAULT_MAX_BYTES) -> ReadResult:
    """Read complete lines of ``path`` from byte ``offset``.

    A last line without its newline is being written: it is left for the next read. A line
    that is not a valid record is rejected (with a reason) and skipped, never retried.
    """
    result = ReadResult(offset=offset)
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read(max_bytes)
    end = chunk.rfind(b"\n")
    if end < 0:
        return result
    for line in chunk[:end].split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            result.rejected.append("malformed")
            continue
        reason = check_record(obj)
        if reason is None:
            result.records.append(obj)
        else:
            result.rejected.append("invalid")
    result.offset = offset + end + 1
    return result
