"""Writing side of the spool, used by the probe's background thread (never the training thread)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from gradwatch.spool.files import open_for_appending, open_for_reading, private_dir
from gradwatch.spool.format import SpoolLayout, safe_run_name

_MAX_NAME_ATTEMPTS = 1000


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside ``path`` and rename it over ``path``: readers see all or nothing."""
    # dumps, then one write: json.dump streams through the pure-Python encoder (10x slower on an agent's
    # checkpoint of thousands of runs)
    write_text_atomic(path, json.dumps(obj, separators=(",", ":"), sort_keys=True))


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` to a temp file beside ``path``, renamed over ``path``: readers see all or nothing."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with _suppress_oserror():
            os.unlink(tmp)
        raise


def claim_run_dir(layout: SpoolLayout, name: str, launch_key: str, take_over: bool = False) -> tuple[str, Path]:
    """Find the run directory for ``name``: the first of ``name``, ``name-2``, ... that is free or
    already claimed by the same launch (the other ranks of this run). ``take_over``: ``name`` itself,
    claimed for this launch whoever had it (a run resumed by new processes).

    The claim is a hard link of a fully written file, so it appears atomically and exactly one
    launch wins a name even when processes race.
    """
    base = safe_run_name(name)
    private_dir(layout.runs_dir)
    fd, tmp = tempfile.mkstemp(prefix=".claim.", dir=layout.runs_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(launch_key)
        if take_over:
            run_dir = layout.run_dir(base)
            private_dir(run_dir)
            os.replace(tmp, SpoolLayout.claim_file(run_dir))  # atomic: the ranks of this launch all write the same
            return base, run_dir
        for attempt in range(1, _MAX_NAME_ATTEMPTS + 1):
            run = base if attempt == 1 else f"{base}-{attempt}"
            run_dir = layout.run_dir(run)
            private_dir(run_dir)
            claim = SpoolLayout.claim_file(run_dir)
            try:
                os.link(tmp, claim)
                return run, run_dir
            except FileExistsError:
                if claim.read_text(encoding="utf-8") == launch_key:
                    return run, run_dir
        raise RuntimeError(f"no free run directory for {base!r} after {_MAX_NAME_ATTEMPTS} attempts")
    finally:
        with _suppress_oserror():
            os.unlink(tmp)


class RecordFileWriter:
    """Appends encoded record lines to ``rank-<r>.records.jsonl``. Not thread-safe: one writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def append(self, data: bytes) -> None:
        if self._file is None:
            mid_line = _ends_mid_line(self.path)
            self._file = open_for_appending(self.path)  # kept open across batches, closed by close()
            if mid_line:
                # a process before this one died mid-line (or the disk filled up): end that line, so that it is
                # rejected alone and does not swallow this process's first record
                self._file.write(b"\n")
        self._file.write(data)
        self._file.flush()  # the agent tails the file: hand each batch to the OS now

    def close(self) -> None:
        if self._file is not None:
            with _suppress_oserror():
                self._file.close()
            self._file = None


def _ends_mid_line(path: Path) -> bool:
    """Whether the file's last line lacks its newline."""
    try:
        with open_for_reading(path) as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return False
            f.seek(size - 1)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, OSError)
