"""Tail the spool into the agent state: new ranks from their metadata, new records from saved offsets.

History: the records a rank wrote before this agent started, by a process that was gone by then (a run
that ended yesterday), still build the run's state and its rules' decisions, but as history: nothing
is sent to a probe and nobody is paged (``Decision.history``, ``Seen.history``). So are the records of a
resumed run from before its last resume, when the agent first reads them with the new process running.

Resumes: a ``checkpoint`` record of rank 0 keeps the rules' state once the records of its step are in;
a ``resume`` record gives it back (rules/engine.py), re-reads the rank's metadata (a new process) and
starts a new decision-id segment.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gradwatch.agent.state import AgentState, RankState
from gradwatch.rules.engine import Decision, RunRules
from gradwatch.spool.format import SpoolLayout, parse_rank_file
from gradwatch.spool.proc import process_alive
from gradwatch.spool.reader import RESUME_MARKER, SpoolFormatError, last_line_with, read_meta, read_records
from gradwatch.spool.records import (
    AckRecord,
    CheckpointRecord,
    EndRecord,
    Record,
    ResumeRecord,
    RunMeta,
    StepRecord,
)

log = logging.getLogger("gradwatch.agent")

#: A run whose process was gone and whose last write was this long before the agent started is history; one
#: that ended just before (a short run that started the agent itself) is not: its last alerts still go out.
HISTORY_AFTER_SECONDS = 60.0
MAX_CHECKPOINTS = 16  # rule states kept per run, for resumes from its newest checkpoints


@dataclass(frozen=True)
class Seen:
    """A record the dispatcher acts on: an ack (an event, an annotation) or a skipped step."""

    run: str
    rank: int
    record: AckRecord | StepRecord
    history: bool = False  # read as history: an event, no annotation


Outgoing = Decision | Seen


class SpoolIngestor:
    def __init__(self, layout: SpoolLayout, state: AgentState, clock: Callable[[], float],
                 local_host: str = "") -> None:
        self.layout = layout
        self.state = state
        self.clock = clock
        self.started_at = clock()
        self.local_host = local_host
        self._judged: set[tuple[str, int]] = set()  # ranks whose history this agent process has judged
        self._reported: set[str] = set()
        # what the dispatcher turns into events and commands: decisions of rules, acks, skipped steps
        self.outbox: list[Outgoing] = []

    def take_outbox(self) -> list[Outgoing]:
        out, self.outbox = self.outbox, []
        return out

    def run_dirs(self) -> list[Path]:
        try:
            return [p for p in self.layout.runs_dir.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []

    def scan_all(self) -> int:
        """A full rescan: every run directory. Returns records applied."""
        dirs = self.run_dirs()
        with self.state.lock:
            self.state.forget_missing({d.name for d in dirs})
            self.state.counters.rescans += 1
        return self.scan(dirs)

    def scan(self, run_dirs: Iterable[Path]) -> int:
        applied = 0
        for run_dir in run_dirs:
            try:
                applied += self._ingest_run(run_dir)
            except Exception as exc:  # one bad run must not stop the others
                with self.state.lock:
                    self.state.counters.handler_errors += 1
                self._report_once(f"run:{run_dir.name}:{type(exc).__name__}",
                                  "error while reading run %s (%r); will retry", run_dir, exc)
        return applied

    def _ingest_run(self, run_dir: Path) -> int:
        run = run_dir.name
        if not run_dir.is_dir():
            return 0
        ranks: set[int] = set()
        size = 0
        for entry in os.scandir(run_dir):
            parsed = parse_rank_file(entry.name)
            if parsed is not None and parsed[1] == "meta.json":
                ranks.add(parsed[0])
            elif parsed is not None:
                size += entry.stat().st_size
        if run in self.state.retired:
            with self.state.lock:
                retired_size = self.state.retired[run]
                if retired_size is None or size <= retired_size:
                    self.state.retired[run] = size if retired_size is None else retired_size
                    return 0
                del self.state.retired[run]  # it resumed after it was retired: read it afresh
            log.info("run %s has new records after it was retired (resumed?): reading it again", run)
            self._judged = {key for key in self._judged if key[0] != run}
        applied = 0
        for rank in sorted(ranks):
            state = self.state.rank(run, rank) or self._add_rank(run_dir, rank)
            if state is not None:
                applied += self._tail(state, SpoolLayout.records_file(run_dir, rank))
        return applied

    def _add_rank(self, run_dir: Path, rank: int) -> RankState | None:
        try:
            meta = read_meta(SpoolLayout.meta_file(run_dir, rank))
        except SpoolFormatError as exc:
            with self.state.lock:
                self.state.rejected_runs[run_dir.name] = str(exc)
            self._report_once(f"meta:{exc}", "%s", exc)
            return None
        with self.state.lock:
            return self.state.add_rank(run_dir.name, rank, meta)

    def _tail(self, state: RankState, path: Path) -> int:
        self._judge_history(state, path)
        applied = 0
        while True:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return applied
            if size <= state.offset:
                return applied
            history = state.offset < state.history_until
            # a batch never spans the end of the history: its records are all history or all live
            result = read_records(path, state.offset, *([state.history_until - state.offset] if history else []))
            if result.offset == state.offset:
                return applied  # only a partial line so far
            now = self.clock()
            with self.state.lock:
                state.history = history
                rules = self.state.rules.for_run(state.run, state.meta) if state.rank == 0 else None
                for record in result.records:
                    self._apply(state, rules, record, path, history)
                state.offset = result.offset
                counters = self.state.counters
                counters.records_ingested += len(result.records)
                for reason in result.rejected:
                    counters.reject(reason)
                if result.records:
                    counters.ingest_lag_seconds = max(0.0, now - result.records[-1].t)
            if result.rejected:
                self._report_once(f"rejected:{path}", "%s: %d invalid record line(s) skipped", path,
                                  len(result.rejected))
            applied += len(result.records)

    def _apply(self, state: RankState, rules: RunRules | None, record: Record, path: Path, history: bool) -> None:
        if rules is not None and state.pending_checkpoint is not None and (
                record.step > state.pending_checkpoint[1] or isinstance(record, (ResumeRecord, EndRecord))):
            self._keep_checkpoint(state, rules)  # the records of the checkpoint's step are all in
        if isinstance(record, ResumeRecord):
            self._resumed(state, rules, record, path)
        elif isinstance(record, CheckpointRecord):
            if rules is not None:  # several saves after one step (Lightning's every-n and last.ckpt): one state
                pending = state.pending_checkpoint
                state.pending_checkpoint = [[*pending[0], record.id] if pending else [record.id], record.step]
            state.apply(record)
            return
        observed = state.apply(record)
        if rules is not None and observed:
            optimizer = record.opt if isinstance(record, StepRecord) and record.opt else "0"
            self.outbox.extend(rules.observe(record.step, record.t, observed, optimizer, history=history))
        if rules is not None and isinstance(record, AckRecord):
            rules.acknowledged(record.id, {"step": record.step, "action": record.action,
                                           "status": record.status.value, "detail": record.detail})
        if isinstance(record, AckRecord) or (isinstance(record, StepRecord) and record.skip is not None):
            self.outbox.append(Seen(state.run, state.rank, record, history))

    @staticmethod
    def _keep_checkpoint(state: RankState, rules: RunRules) -> None:
        assert state.pending_checkpoint is not None
        ids = state.pending_checkpoint[0]
        state.pending_checkpoint = None
        saved = {"rules": rules.checkpoint_state(), "spikes": {k: d.state_dict() for k, d in state.detectors.items()}}
        for checkpoint_id in ids if isinstance(ids, list) else [ids]:
            state.checkpoints.pop(str(checkpoint_id), None)
            state.checkpoints[str(checkpoint_id)] = saved
        while len(state.checkpoints) > MAX_CHECKPOINTS:
            del state.checkpoints[next(iter(state.checkpoints))]

    def _resumed(self, state: RankState, rules: RunRules | None, record: ResumeRecord, path: Path) -> None:
        meta: RunMeta | None = None
        with contextlib.suppress(SpoolFormatError):  # unreadable: the old metadata stays
            meta = read_meta(SpoolLayout.meta_file(path.parent, state.rank))
        state.resumed(record, meta)
        saved = state.checkpoints.get(record.checkpoint) if record.checkpoint else None
        if saved is not None:
            for name, detector in state.detectors.items():
                detector.load_state_dict(saved.get("spikes", {}).get(name, {}))
        if rules is not None:
            rules.resume_from(saved.get("rules") if saved is not None else None)
            log.info("run %s resumed after step %d%s", state.run, record.step,
                     f" from checkpoint {record.checkpoint}" if saved is not None else
                     " (no checkpoint of its rules' state: they go on as they were)")

    def _judge_history(self, state: RankState, path: Path) -> None:
        """Once per rank and agent process: which of its unread records are history (see the module's doc)."""
        key = (state.run, state.rank)
        if key in self._judged:
            return
        self._judged.add(key)
        try:
            stat = path.stat()
        except OSError:
            return
        if stat.st_size <= state.offset:
            return
        meta = state.meta
        gone = meta.host == self.local_host and meta.pid > 0 and \
            process_alive(meta.pid, meta.proc_start_ticks) is False
        if gone and stat.st_mtime < self.started_at - HISTORY_AFTER_SECONDS:
            state.history_until = stat.st_size
            log.info("run %s rank %d ended before this agent started: its records are read as history (no "
                     "commands, no alerts)", state.run, state.rank)
            return
        resumed_at = last_line_with(path, RESUME_MARKER, stat.st_size)
        if resumed_at is not None and resumed_at > state.offset:
            state.history_until = resumed_at  # what the processes before its last resume wrote

    def _report_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message, *args)
