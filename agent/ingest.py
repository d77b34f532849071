"""Tail the spool into the agent state: new ranks from their metadata, new records from saved offsets."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gradwatch.agent.state import AgentState, RankState
from gradwatch.rules.engine import Decision
from gradwatch.spool.format import SpoolLayout, parse_rank_file
from gradwatch.spool.reader import SpoolFormatError, read_meta, read_records
from gradwatch.spool.records import AckRecord, StepRecord

log = logging.getLogger("gradwatch.agent")


@dataclass(frozen=True)
class Seen:
    """A record the dispatcher acts on: an ack (an event, an annotation) or a skipped step."""

    run: str
    rank: int
    record: AckRecord | StepRecord


Outgoing = Decision | Seen


class SpoolIngestor:
    def __init__(self, layout: SpoolLayout, state: AgentState, clock: Callable[[], float]) -> None:
        self.layout = layout
        self.state = state
        self.clock = clock
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
        if run in self.state.retired or not run_dir.is_dir():
            return 0
        ranks: set[int] = set()
        for entry in os.scandir(run_dir):
            parsed = parse_rank_file(entry.name)
            if parsed is not None and parsed[1] == "meta.json":
                ranks.add(parsed[0])
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
        applied = 0
        while True:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return applied
            if size <= state.offset:
                return applied
            result = read_records(path, state.offset)
            if result.offset == state.offset:
                return applied  # only a partial line so far
            now = self.clock()
            with self.state.lock:
                rules = self.state.rules.for_run(state.run, state.meta) if state.rank == 0 else None
                for record in result.records:
                    observed = state.apply(record)
                    if rules is not None and observed:
                        optimizer = record.opt if isinstance(record, StepRecord) and record.opt else "0"
                        self.outbox.extend(rules.observe(record.step, record.t, observed, optimizer))
                    if rules is not None and isinstance(record, AckRecord):
                        rules.acknowledged(record.id, {"step": record.step, "action": record.action,
                                                       "status": record.status.value, "detail": record.detail})
                    if isinstance(record, AckRecord) or (isinstance(record, StepRecord) and record.skip is not None):
                        self.outbox.append(Seen(state.run, state.rank, record))
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

    def _report_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message, *args)
