"""The probe's side of the spool (writer thread only): claim the run directory, write this rank's
metadata, append record lines, and retry later when the spool cannot be written.

Training goes on whatever happens here: a failure drops the lines (counted by the caller) and
the next attempt waits ``RETRY_OPEN_SECONDS``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradwatch.probes import stacks
from gradwatch.probes.control import CommandReader, acked_ids
from gradwatch.probes.identity import ProcessIdentity
from gradwatch.probes.warn_once import WarnOnce
from gradwatch.spool.files import load_json
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.proc import process_alive
from gradwatch.spool.reader import MAX_META_BYTES
from gradwatch.spool.records import RunMeta, meta_to_json
from gradwatch.spool.writer import RecordFileWriter, claim_run_dir, write_json_atomic

RETRY_OPEN_SECONDS = 5.0


class SpoolSession:
    def __init__(self, layout: SpoolLayout, requested_run: str, identity: ProcessIdentity,
                 make_meta: Callable[[str], RunMeta], warn: WarnOnce,
                 on_agent_needed: Callable[[SpoolLayout], object] | None, read_commands: bool) -> None:
        self.layout = layout
        self.requested_run = requested_run
        self.identity = identity
        self._make_meta = make_meta
        self._warn = warn
        self._on_agent_needed = on_agent_needed
        self._read_commands = read_commands
        self._file: RecordFileWriter | None = None
        self._next_open_attempt = 0.0
        self.resuming = False  # continue the run requested_run names (take its directory over)
        self.run_name: str | None = None
        self.run_dir: Path | None = None
        self.commands: CommandReader | None = None  # once the run directory exists, if commands are wanted
        self.lines_dropped = 0  # lines lost to I/O errors

    def open(self) -> bool:
        """Claim the run directory and write the metadata (once), open the records file; False when the
        spool cannot be written now (retried after RETRY_OPEN_SECONDS)."""
        if self._file is not None:
            return True
        if time.monotonic() < self._next_open_attempt:
            return False
        try:
            if self.run_dir is None:
                name, run_dir = claim_run_dir(self.layout, self.requested_run, self.identity.launch_key,
                                              take_over=self.resuming)
                meta_file = SpoolLayout.meta_file(run_dir, self.identity.rank)
                before = self._check_rank_unclaimed(meta_file)
                meta = self._make_meta(name)
                meta.stack_signal = stacks.register(SpoolLayout.stacks_file(run_dir, self.identity.rank))
                meta.main_thread = stacks.main_thread_ident() if meta.stack_signal else 0
                # the directory's creator: kept by a resumed run, so the agent knows it is the same run
                created_by = before.get("run_uid") if self.resuming else None
                meta.run_uid = created_by if isinstance(created_by, str) and created_by else meta.launch_key
                write_json_atomic(meta_file, meta_to_json(meta))
                self.run_name, self.run_dir = name, run_dir
                if self._read_commands:
                    records_file = SpoolLayout.records_file(run_dir, self.identity.rank)
                    self.commands = CommandReader(run_dir, acked_ids(records_file), self.identity.launch_key)
                self._start_agent_if_needed()
            self._file = RecordFileWriter(SpoolLayout.records_file(self.run_dir, self.identity.rank))
            return True
        except OSError as exc:
            self._warn("open", "cannot create the run spool under %s (%s); training goes on, records are dropped and "
                       "counted; set GRADWATCH_HOME to a writable directory", self.layout.runs_dir, exc)
            self._next_open_attempt = time.monotonic() + RETRY_OPEN_SECONDS
            return False

    def append(self, lines: list[bytes]) -> None:
        """Append complete lines in one write; on failure they are dropped and counted."""
        if not self.open():
            self.lines_dropped += len(lines)
            return
        assert self._file is not None
        try:
            self._file.append(b"".join(lines))
        except OSError as exc:
            self.lines_dropped += len(lines)
            self._warn("write", "cannot write to the spool %s (%s); training goes on, records are dropped and counted",
                       self._file.path, exc)
            self.close()
            self._next_open_attempt = time.monotonic() + RETRY_OPEN_SECONDS

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _check_rank_unclaimed(self, meta_file: Path) -> dict[str, Any]:
        """Two live processes of one launch with the same rank: attach ran before the rank was known.
        Returns the metadata found there ({} if none)."""
        try:
            other = load_json(meta_file, MAX_META_BYTES)
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        if not isinstance(other, dict):
            return {}
        pid = other.get("pid")
        if isinstance(pid, int) and pid != self.identity.pid and other.get("host") == self.identity.host \
                and process_alive(pid) is not False:
            self._warn("rank-clash", "process %d also claims rank %d of run %s; their records will be mixed. Call "
                       "gradwatch.attach() after torch.distributed.init_process_group(), or pass rank= and "
                       "world_size=", pid, self.identity.rank, meta_file.parent.name)
        return other

    def _start_agent_if_needed(self) -> None:
        if self._on_agent_needed is None:
            return
        try:
            self._on_agent_needed(self.layout)
        except Exception as exc:
            self._warn("autostart", "could not start a gradwatch agent (%s); run `gradwatch agent` yourself", exc)
