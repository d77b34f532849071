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
import heapq
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gradwatch.agent.faults import Stage
from gradwatch.agent.state import AgentState, RankState
from gradwatch.rules.engine import Decision, RuleFailure, RunRules
from gradwatch.spool.files import file_kind
from gradwatch.spool.format import SpoolLayout, parse_rank_file
from gradwatch.spool.proc import judges_pid, process_alive
from gradwatch.spool.reader import (
    DEFAULT_MAX_BYTES,
    RESUME_MARKER,
    SpoolFormatError,
    last_line_with,
    read_meta,
    read_records,
)
from gradwatch.spool.records import (
    AckRecord,
    ActivationsRecord,
    CheckpointRecord,
    EndRecord,
    LayersRecord,
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
#: How often a rank's records file is looked at (a stat): every HOT_POLL_SECONDS while it grows, so that a rule
#: acts within a step or two; a quiet one less and less often, down to once every COLD_POLL_SECONDS (the cost
#: of an idle agent of 5,000 ranks: 2,500 stats a second).
HOT_POLL_SECONDS = 0.025
COLD_POLL_SECONDS = 2.0
ENDED_POLL_SECONDS = 10.0  # a rank whose run ended: it only grows when resumed (whose new metadata the rescan sees)
#: Looks at growing files a second, at most, before their interval grows past HOT_POLL_SECONDS (up to
#: MAX_HOT_POLL_SECONDS): with hundreds of ranks writing, each read then takes several records, not one.
POLL_BUDGET_PER_SECOND = 4000
MAX_HOT_POLL_SECONDS = 0.25
POLL_BATCH_BYTES = 256 * 1024  # a rank's read per pass (~1,700 records); the next pass goes on
POLL_PASS_SECONDS = 0.2
FULL_RESCAN_EVERY = 12  # rescans: every 12th reads every run directory, the others only those that changed


@dataclass
class _Tail:
    """When to look at one rank's records file next."""

    state: RankState  # the rank it follows (a run read again gets new RankStates: this tail is then dropped)
    path: Path
    name: str  # str(path), for os.stat
    interval: float = HOT_POLL_SECONDS
    due: float = 0.0  # time.monotonic()
    grew: bool = True  # at the last look
    entry: int = -1  # its entry in the heap of dues (older entries of it are stale)


@dataclass(frozen=True)
class Seen:
    """A record the dispatcher acts on: an ack (an event, an annotation) or a skipped step."""

    run: str
    rank: int
    record: AckRecord | StepRecord
    history: bool = False  # read as history: an event, no annotation


Outgoing = Decision | Seen | RuleFailure


RankFiles = dict[int, tuple[int | None, tuple[int, int] | None]]


def _rank_files(run_dir: Path, odd: list[str]) -> RankFiles | None:
    """rank -> (stamp of its metadata file: inode and mtime, (inode, size) of its records file), of the regular files;
    a FIFO, a device or a directory in a rank file's place is never opened: it is named in ``odd``. None when
    ``run_dir`` is not a directory."""
    files: RankFiles = {}
    try:
        entries = list(os.scandir(run_dir))
    except (NotADirectoryError, FileNotFoundError):
        return None
    for entry in entries:
        parsed = parse_rank_file(entry.name)
        if parsed is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            odd.append(f"{entry.name} is {file_kind(st.st_mode)}, not a regular file: remove it")
            continue
        meta, records = files.get(parsed[0], (None, None))
        if parsed[1] == "meta.json":
            # which file, and which version of it: a file recreated at once can get the inode of the one deleted
            meta = (st.st_ino << 64) | (st.st_mtime_ns & 0xFFFF_FFFF_FFFF_FFFF)
        else:
            records = (st.st_ino, st.st_size)
        files[parsed[0]] = (meta, records)
    return files


class SpoolIngestor:
    def __init__(self, layout: SpoolLayout, state: AgentState, clock: Callable[[], float],
                 local_host: str = "", stuck_after: float = 30.0) -> None:
        self.layout = layout
        self.stuck_after = stuck_after  # a records file ending mid-line this long, its process alive: stuck
        self.state = state
        self.clock = clock
        self.started_at = clock()
        self.local_host = local_host
        self._judged: set[tuple[str, int]] = set()  # ranks whose history this agent process has judged
        self._reported: set[str] = set()
        self._tails: dict[tuple[str, int], _Tail] = {}
        self._dir_stamps: dict[str, int] = {}  # run -> mtime of its directory when last read whole
        self._rescans = 0
        self.next_poll = 0.0  # time.monotonic() at which the next rank is due (poll)
        self._growing = 0  # ranks that grew at their last look (POLL_BUDGET_PER_SECOND)
        self._due: list[tuple[float, int, tuple[str, int]]] = []  # heap: (due, order, (run, rank))
        self._order = itertools.count()  # ties in the heap: first pushed, first out
        self._synced_at, self._ranks_added = 0.0, False
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
        """Every run directory, every rank: what is new since the last read. Returns records applied."""
        return self._scan_dirs(full=True, read=True)

    def rescan(self) -> int:
        """The daemon's periodic look for what the watcher missed: the run directories that are new or changed
        since they were last read whole (their mtime: a file made, moved in or removed); every one of them on
        each FULL_RESCAN_EVERY-th. Appends to known files are the poll's. Returns records applied."""
        full = self._rescans % FULL_RESCAN_EVERY == 0
        self._rescans += 1
        return self._scan_dirs(full, read=False)

    def _scan_dirs(self, full: bool, read: bool) -> int:
        dirs = self.run_dirs()
        names = {d.name for d in dirs}
        with self.state.lock:
            self.state.forget_missing(names)
            self.state.counters.rescans += 1
        self._dir_stamps = {run: stamp for run, stamp in self._dir_stamps.items() if run in names}
        if not full:
            dirs = [d for d in dirs if self._dir_changed(d)]
        return self.scan(dirs, read)

    def _dir_changed(self, run_dir: Path) -> bool:
        try:
            return os.stat(run_dir).st_mtime_ns != self._dir_stamps.get(run_dir.name)
        except OSError:
            return True

    def _sync_tails(self, now: float) -> None:
        """A tail for every rank of the state (ranks added by a scan, or restored from a checkpoint)."""
        for run, ranks in self.state.runs.items():
            for rank, state in ranks.items():
                tail = self._tails.get((run, rank))
                if tail is None or tail.state is not state:
                    if tail is not None:
                        self._growing -= tail.grew
                    path = SpoolLayout.records_file(self.layout.run_dir(run), rank)
                    self._tails[(run, rank)] = tail = _Tail(state, path, str(path))
                    self._growing += 1
                    self._schedule((run, rank), tail, now)
        self._synced_at, self._ranks_added = now, False

    def _due_now(self, run: str) -> None:
        now = time.monotonic()
        for rank in self.state.runs.get(run, {}):
            tail = self._tails.get((run, rank))
            if tail is not None and tail.due > now:
                tail.interval = HOT_POLL_SECONDS
                self._schedule((run, rank), tail, now)

    def _schedule(self, key: tuple[str, int], tail: _Tail, due: float) -> None:
        tail.due, tail.entry = due, next(self._order)
        heapq.heappush(self._due, (due, tail.entry, key))

    def poll(self) -> int:
        """Read what the ranks appended since they were last looked at: a ``stat`` of each rank's records file
        that is due (see HOT_POLL_SECONDS; a heap by due time: a pass costs the ranks due, not all of them), a read
        of those that grew. A file replaced or shrunk since is read as a new run (scan). A pass reads at most
        POLL_BATCH_BYTES of a rank and stops after POLL_PASS_SECONDS (the ranks left are the first due next
        time), so that the loop's other work (states, alerts, checkpoints) goes on when the agent falls
        behind. Returns records applied."""
        now = time.monotonic()
        if self._ranks_added or now - self._synced_at > 1.0:
            self._sync_tails(now)
        applied, replaced = 0, []
        faults = self.state.faults
        hot = min(MAX_HOT_POLL_SECONDS, max(HOT_POLL_SECONDS, self._growing / POLL_BUDGET_PER_SECOND))
        due, failed = self._due, set()
        while due and due[0][0] <= now:
            if time.monotonic() - now > POLL_PASS_SECONDS:
                break
            _, entry, key = heapq.heappop(due)
            run = key[0]
            tail = self._tails.get(key)
            if tail is not None and tail.entry != entry:
                continue  # a stale entry: the tail was scheduled again since
            if tail is None or self.state.runs.get(run, {}).get(key[1]) is not tail.state:
                if tail is not None:  # its rank is gone, or read again (a new tail comes with the next sync)
                    del self._tails[key]
                    self._growing -= tail.grew
                continue
            if run in failed or faults.backing_off(run, Stage.INGEST):
                self._schedule(key, tail, now + COLD_POLL_SECONDS)
                continue
            state, grew, more = tail.state, False, False
            try:
                try:
                    st = os.stat(tail.name, follow_symlinks=False)
                except FileNotFoundError:
                    st = None  # not written yet, or the run was removed: the watcher and the rescan see it
                if st is not None:
                    if not stat.S_ISREG(st.st_mode) or st.st_size < state.offset or (
                            state.records_inode and st.st_ino != state.records_inode):
                        replaced.append(run)
                    elif st.st_size > state.offset:
                        before = state.offset
                        applied += self._tail(state, tail.path, st.st_ino, st.st_size, batches=1,
                                              batch_bytes=POLL_BATCH_BYTES)
                        grew = state.offset > before
                        more = grew and state.offset < st.st_size
            except Exception as exc:  # one run's failure must not cost the others: kept, reported, retried later
                faults.failed(run, Stage.INGEST, f"{type(exc).__name__}: {exc}")
                failed.add(run)
            else:
                faults.recovered(run, Stage.INGEST)
            self._growing += grew - tail.grew
            tail.grew = grew
            tail.interval = hot if grew else min(tail.interval * 2,
                                                 ENDED_POLL_SECONDS if state.status.ended else COLD_POLL_SECONDS)
            self._schedule(key, tail, now if more else now + tail.interval)  # more: the next pass goes on
        # passes at most 40 a second (files due together), unless this one was cut short
        self.next_poll = max(due[0][0], now + HOT_POLL_SECONDS) if due and due[0][0] > now else \
            time.monotonic() if due else now + COLD_POLL_SECONDS
        if replaced:
            applied += self.scan((self.layout.runs_dir / run for run in dict.fromkeys(replaced)), read=False)
        return applied

    def scan(self, run_dirs: Iterable[Path], read: bool = True) -> int:
        """Find the runs' ranks and files (new ones, replaced ones) and, with ``read``, apply their new records.
        The daemon leaves the reading to ``poll`` (in bounded batches: a scan must not hold the loop for a
        backlog of thousands of runs). Returns records applied."""
        applied = 0
        faults = self.state.faults
        for run_dir in run_dirs:
            run = run_dir.name
            if faults.backing_off(run, Stage.INGEST):
                continue  # it failed a moment ago: retried after its backoff, the other runs go on
            try:
                stamp: int | None = os.stat(run_dir).st_mtime_ns  # before reading: a change during it is seen next
            except OSError:
                stamp = None
            with faults.guard(run, Stage.INGEST):
                applied += self._ingest_run(run_dir, read)
                if stamp is not None:  # read whole: the rescans pass it by until it changes (not after a failure)
                    self._dir_stamps[run] = stamp
            self._due_now(run)  # something changed there (a file made, a resumed process): looked at next poll
        return applied

    def _ingest_run(self, run_dir: Path, read: bool = True) -> int:
        run = run_dir.name
        odd: list[str] = []
        files = _rank_files(run_dir, odd)
        if files is None:
            return 0
        if odd:
            self.state.faults.failed(run, Stage.FILES, "; ".join(odd), backoff=False)
        else:
            self.state.faults.recovered(run, Stage.FILES)
        if run in self.state.retired and not self._unretired(run, files):
            return 0
        applied = 0
        for rank, (meta_stamp, records) in sorted(files.items()):
            if meta_stamp is None:
                continue  # records without metadata (yet): read once it is written
            state = self.state.rank(run, rank)
            if state is not None and self._replaced(state, run_dir, meta_stamp, records):
                log.info("run %s: its files were replaced (the directory recreated, a file truncated, or another run "
                         "under the same name): reading it from the start as a new run", run)
                with self.state.lock:
                    self.state.drop_run(run)
                self._judged = {key for key in self._judged if key[0] != run}
                return applied + self._ingest_run(run_dir, read)
            if state is None:
                state = self._add_rank(run_dir, rank, meta_stamp)
            if state is not None and records is not None and read:
                applied += self._tail(state, SpoolLayout.records_file(run_dir, rank), *records)
        return applied

    def _unretired(self, run: str, files: RankFiles) -> bool:
        """A retired run is read afresh when its records grew (it resumed) or its files were replaced (a new
        run under its name); else it stays retired (False)."""
        size = sum(records[1] for _, records in files.values() if records is not None)
        metas = {rank: meta for rank, (meta, _) in files.items() if meta is not None}
        with self.state.lock:
            tomb = self.state.retired[run]
            if tomb.size is None:  # retired since the last scan: the size it has now is the one it had
                tomb.size = size
            if not tomb.meta_stamps:  # a tombstone of an older agent's checkpoint
                tomb.meta_stamps = metas
            if size == tomb.size and (not tomb.meta_stamps or metas == tomb.meta_stamps):
                return False
            del self.state.retired[run]
        log.info("run %s has new or replaced records after it was retired (resumed, or a new run under the name): "
                 "reading it again", run)
        self._judged = {key for key in self._judged if key[0] != run}
        return True

    def _replaced(self, state: RankState, run_dir: Path, meta_stamp: int, records: tuple[int, int] | None) -> bool:
        """Whether the rank's files are no longer the ones its state was read from."""
        if records is not None:
            inode, size = records
            if size < state.offset or (state.records_inode and inode != state.records_inode):
                return True
            state.records_inode = inode
        if meta_stamp != state.meta_stamp:
            known = state.meta_stamp
            state.meta_stamp = meta_stamp
            if known:  # rewritten: by a resumed process of the run (same run_uid), or by a new run
                with contextlib.suppress(SpoolFormatError):
                    meta = read_meta(SpoolLayout.meta_file(run_dir, state.rank))
                    return bool(meta.run_uid and state.meta.run_uid and meta.run_uid != state.meta.run_uid)
        return False

    def _add_rank(self, run_dir: Path, rank: int, meta_stamp: int) -> RankState | None:
        try:
            meta = read_meta(SpoolLayout.meta_file(run_dir, rank))
        except SpoolFormatError as exc:
            with self.state.lock:
                self.state.rejected_runs[run_dir.name] = str(exc)
            self._report_once(f"meta:{exc}", "%s", exc)
            return None
        with self.state.lock:
            state = self.state.add_rank(run_dir.name, rank, meta)
            state.meta_stamp = meta_stamp
        self._ranks_added = True  # the next poll follows it
        return state

    def _tail(self, state: RankState, path: Path, inode: int, size: int, batches: int | None = None,
              batch_bytes: int = DEFAULT_MAX_BYTES) -> int:
        """Apply the rank's records up to ``size`` (at most ``batches`` reads of ``batch_bytes``)."""
        self._judge_history(state, path, size)
        state.records_inode = inode
        applied = 0
        while size > state.offset:
            history = state.offset < state.history_until
            # a batch never spans the end of the history: its records are all history or all live
            cap = min(DEFAULT_MAX_BYTES, state.history_until - state.offset) if history else DEFAULT_MAX_BYTES
            limit = min(cap, batch_bytes)
            result = read_records(path, state.offset, limit, in_long_line=state.in_long_line)
            if result.offset == state.offset and limit < cap and size - state.offset > limit:
                result = read_records(path, state.offset, cap, in_long_line=state.in_long_line)  # a long line
            if result.offset == state.offset:
                self._ends_mid_line(state, path, size)  # only a partial line so far
                return applied
            now = self.clock()
            with self.state.lock:
                state.history = history
                rules = self.state.rules.for_run(state.run, state.meta) if state.rank == 0 else None
                for record in result.records:
                    self._apply_one(state, rules, record, path, history)
                state.offset, state.in_long_line, state.partial_at = result.offset, result.in_long_line, None
                counters = self.state.counters
                counters.records_ingested += len(result.records)
                for reason in result.rejected:
                    counters.reject(reason)
                if result.records:
                    counters.ingest_lag_seconds = max(0.0, now - result.records[-1].t)
            if result.rejected:
                self._report_once(f"rejected:{path}", "%s: %d invalid record line(s) skipped (%s)", path,
                                  len(result.rejected), ", ".join(sorted(set(result.rejected))))
            applied += len(result.records)
            self.state.faults.recovered(state.run, Stage.STUCK)
            if result.at_end and not history:
                break  # what was written while this read ran: the next scan
            if batches is not None:
                batches -= 1
                if batches <= 0:
                    break
        return applied

    def _ends_mid_line(self, state: RankState, path: Path, size: int) -> None:
        """The records file ends in a line without its newline. A writer in the middle of a write finishes it in
        a moment; a process that died mid-line never will (its line is dropped as "truncated"); one that stays
        unfinished while the process lives (a full disk) is reported as stuck."""
        now = self.clock()
        if state.partial_at is None or state.partial_at[:2] != [state.offset, size]:
            state.partial_at = [state.offset, size, now]
            return
        if state.status.ended:
            dropped = size - state.offset
            with self.state.lock:
                state.offset, state.partial_at, state.in_long_line = size, None, False
                self.state.counters.reject("truncated")
            self._report_once(f"truncated:{path}:{size}", "%s: its last line was never completed (the process ended "
                              "mid-write); %d bytes dropped", path, dropped)
            return
        if now - state.partial_at[2] >= self.stuck_after:
            self.state.faults.failed(state.run, Stage.STUCK, (
                f"rank {state.rank}: {path.name} has ended mid-line for {now - state.partial_at[2]:.0f} s "
                f"({size - int(state.partial_at[0])} bytes; a full disk, or a writer that hangs); its newer records "
                f"wait for that line"), backoff=False)

    def _apply_one(self, state: RankState, rules: RunRules | None, record: Record, path: Path, history: bool) -> None:
        """Apply one record; one that the agent cannot apply is skipped (counted, named once), never retried."""
        try:
            self._apply(state, rules, record, path, history)
        except Exception as exc:  # a record must never cost the records after it, nor be applied twice
            self.state.counters.reject("unprocessable")
            self._report_once(f"apply:{path}:{type(exc).__name__}", "%s: skipped a %s record of step %d that the agent "
                              "could not apply (%s: %s)", path, record.KIND.value, record.step, type(exc).__name__, exc)

    def _rules_failed(self, state: RankState, rules: RunRules) -> None:
        for failure in rules.take_failures():
            self.state.faults.failed(state.run, Stage.RULES, f"rule {failure.rule} failed at step {failure.step} "
                                     f"({failure.error}); disabled for this run", backoff=False)
            self.outbox.append(failure)

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
        if rules is not None and isinstance(record, (LayersRecord, ActivationsRecord)):  # the catalogue's samples
            self.outbox.extend(rules.observe_sample(record, history=history))
            if rules.failures:
                self._rules_failed(state, rules)
        if rules is not None and observed:
            optimizer = record.opt if isinstance(record, StepRecord) and record.opt else "0"
            self.outbox.extend(rules.observe(record.step, record.t, observed, optimizer, history=history))
            if rules.failures:
                self._rules_failed(state, rules)
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

    def _judge_history(self, state: RankState, path: Path, size: int) -> None:
        """Once per rank and agent process: which of its unread records are history (see the module's doc)."""
        key = (state.run, state.rank)
        if key in self._judged:
            return
        self._judged.add(key)
        if size <= state.offset:
            return
        try:
            stat = path.stat()
        except OSError:
            return
        meta = state.meta
        gone = judges_pid(meta.host, meta.pid, meta.pid_namespace, self.local_host) and \
            process_alive(meta.pid, meta.proc_start_ticks) is False
        if gone and stat.st_mtime < self.started_at - HISTORY_AFTER_SECONDS:
            state.history_until = size
            log.info("run %s rank %d ended before this agent started: its records are read as history (no "
                     "commands, no alerts)", state.run, state.rank)
            return
        resumed_at = last_line_with(path, RESUME_MARKER, size)
        if resumed_at is not None and resumed_at > state.offset:
            state.history_until = resumed_at  # what the processes before its last resume wrote

    def _report_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message, *args)
