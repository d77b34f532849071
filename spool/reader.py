"""Reading side of the spool, used by the agent (and by ``gradwatch status`` without an agent)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gradwatch.spool.files import load_json, open_for_reading, read_at
from gradwatch.spool.format import FORMAT_NAME, FORMAT_VERSION, parse_major
from gradwatch.spool.records import Record, RecordError, RunMeta, decode_line, decode_meta

log = logging.getLogger("gradwatch")
SUPPORTED_MAJOR = parse_major(FORMAT_VERSION)
ACK_MARKER = b'"kind":"ack"'  # how an encoded ack record line starts (spool.records.encode)
RESUME_MARKER = b'"kind":"resume"'
_BACKWARD_CHUNK = 1 << 20
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
MAX_LINE_BYTES = DEFAULT_MAX_BYTES  # a longer record line is rejected ("oversize") and skipped
MAX_META_BYTES = 1024 * 1024  # a metadata file larger than this is refused


class SpoolFormatError(Exception):
    """A spool file this agent cannot use; the message says which file and what to do."""


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    offset: int = 0  # just past the last complete line consumed
    rejected: list[str] = field(default_factory=list)  # one reason per rejected line
    in_long_line: bool = False  # the offset is inside a line over MAX_LINE_BYTES: skip to its end next time
    at_end: bool = True  # the read reached the end of the file (as it was then)


def read_meta(path: Path) -> RunMeta:
    """Load and check a ``rank-<r>.meta.json``; raise SpoolFormatError with a clear message."""
    try:
        obj = load_json(path, MAX_META_BYTES)
    except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8, too large
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
        with open_for_reading(path) as f:
            for line in f:
                if only_lines_with not in line:
                    continue
                try:
                    ids.add(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    except OSError as exc:  # not a regular file, unreadable: no ids, and the caller's write will say why
        log.debug("cannot read %s: %s", path, exc)
    return ids


def last_line_with(path: Path, marker: bytes, end: int) -> int | None:
    """The byte offset where the last line before ``end`` that contains ``marker`` starts (read backwards in
    chunks: only the file's tail is read when the line is near its end); None when there is none."""
    try:
        with open_for_reading(path) as f:
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


def read_records(path: Path, offset: int, max_bytes: int = DEFAULT_MAX_BYTES, in_long_line: bool = False) -> ReadResult:
    """Read complete lines of ``path`` from byte ``offset`` (at most ``max_bytes`` of it).

    A last line without its newline is being written: it is left for the next read. A line
    that is not a valid record is rejected (with a reason) and skipped, never retried; a record
    of a kind from a newer minor version is skipped. A line longer than MAX_LINE_BYTES is rejected
    ("oversize") and skipped: ``in_long_line`` says the offset is inside one (from the last result).
    Raises OSError (NotARegularFile for a FIFO or a device in the file's place).
    """
    result = ReadResult(offset=offset)
    chunk = read_at(path, offset, max_bytes)
    result.at_end = len(chunk) < max_bytes
    start = 0
    if in_long_line:
        newline = chunk.find(b"\n")
        if newline < 0:  # still inside it
            result.offset, result.in_long_line = offset + len(chunk), bool(chunk)
            return result
        start = newline + 1
    end = chunk.rfind(b"\n")
    if end < start:  # no complete line after start
        if len(chunk) - start >= MAX_LINE_BYTES:
            result.rejected.append("oversize")
            result.offset, result.in_long_line = offset + len(chunk), True
        else:
            result.offset = offset + start
        return result
    for line in chunk[start:end].split(b"\n"):
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
    offset, in_long_line = 0, False
    while True:
        result = read_records(path, offset, in_long_line=in_long_line)
        records += result.records
        if result.offset == offset:
            return records
        offset, in_long_line = result.offset, result.in_long_line
