"""Reading side of the spool, used by the agent (and by ``gradwatch status`` without an agent)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gradwatch.spool.format import FORMAT_NAME, FORMAT_VERSION, parse_major
from gradwatch.spool.records import Record, RecordError, RunMeta, decode_line, decode_meta

SUPPORTED_MAJOR = parse_major(FORMAT_VERSION)
ACK_MARKER = b'"kind":"ack"'  # how an encoded ack record line starts (spool.records.encode)
RESUME_MARKER = b'"kind":"resume"'
_BACKWARD_CHUNK = 1 << 20
DEFAULT_MAX_BYTES = 8 * 1024 * 1024


class SpoolFormatError(Exception):
    """A spool file this agent cannot use; the message says which file and what to do."""


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    offset: int = 0  # just past the last complete line consumed
    rejected: list[str] = field(default_factory=list)  # one reason per rejected line


def read_meta(path: Path) -> RunMeta:
    """Load and check a ``rank-<r>.meta.json``; raise SpoolFormatError with a clear message."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpoolFormatError(f"{path}: cannot read run metadata ({exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise SpoolFormatError(f"{path}: not gradwatch run metadata (field 'format' must be {FORMAT_NAME!r})")
    version = str(obj.get("format_version", ""))
    major = parse_major(version)
    if major is None:
        raise SpoolFormatError(f"{path}: field 'format_version' is {version[:20]!r}, expected 'MAJOR.MINOR'")
    if major > (SUPPORTED_MAJOR or 0):
        raise SpoolFormatError(
            f"{path}: spool format {version} is newer than this agent understands "
            f"({FORMAT_VERSION}); upgrade gradwatch on the agent side (pip install -U gradwatch)"
        )
    try:
        return decode_meta(obj)
    except RecordError as exc:
        raise SpoolFormatError(f"{path}: {exc}") from None


def read_ids(path: Path, only_lines_with: bytes = b"") -> set[str]:
    """The ``id`` fields of a JSON-lines file (commands, events, or the ack records of a records file
    when ``only_lines_with`` is ``ACK_MARKER``). A missing file has none; bad lines are skipped."""
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


def last_line_with(path: Path, marker: bytes, end: int) -> int | None:
    """The byte offset where the last line before ``end`` that contains ``marker`` starts (read backwards in
    chunks: only the file's tail is read when the line is near its end); None when there is none."""
    try:
        with open(path, "rb") as f:
            hit = _rfind(f, marker, end)
            if hit is None:
                return None
            newline = _rfind(f, b"\n", hit)
            return 0 if newline is None else newline + 1
    except OSError:
        return None


def _rfind(f: IO[bytes], needle: bytes, end: int) -> int | None:
    """The offset of the last ``needle`` that ends at or before ``end`` in the file ``f``."""
    position, carry = end, b""
    while position > 0:
        start = max(0, position - _BACKWARD_CHUNK)
        f.seek(start)
        chunk = f.read(position - start) + carry
        hit = chunk.rfind(needle)
        if hit >= 0:
            return start + hit
        carry = chunk[:len(needle) - 1]  # a needle split across two chunks
        position = start
    return None


def read_records(path: Path, offset: int, max_bytes: int = DEFAULT_MAX_BYTES) -> ReadResult:
    """Read complete lines of ``path`` from byte ``offset``.

    A last line without its newline is being written: it is left for the next read. A line
    that is not a valid record is rejected (with a reason) and skipped, never retried; a record
    of a kind from a newer minor version is skipped.
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
            record = decode_line(line)
        except RecordError as exc:
            result.rejected.append(exc.reason)
            continue
        if record is not None:
            result.records.append(record)
    result.offset = offset + end + 1
    return result


def read_all_records(path: Path) -> list[Record]:
    """Every valid record of a records file (tools and tests; the agent tails with read_records)."""
    records: list[Record] = []
    offset = 0
    while True:
        result = read_records(path, offset)
        records += result.records
        if result.offset == offset:
            return records
        offset = result.offset
