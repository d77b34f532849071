"""The recorded history of a run, read from the spool alone (no agent, no Prometheus).

    run = gradwatch.read_run("lr-sweep-3e-4")
    for step in run.rank(0).steps:
        print(step.step, step.grad_norm, step.values.get("loss"))

Every record a probe wrote, per rank, as the typed records of the spool contract (gradwatch.spool.records):
steps with the scalars logged after them merged in, logged scalars that joined no step, the actions the probe
applied (acknowledgements), per-layer statistics, checkpoints, resumes and the end; and the agent's decisions
about the run (its ``events.jsonl``). Reading never writes and never needs the agent; a run being written is
read up to its last complete line.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.errors import GradwatchError
from gradwatch.spool.files import open_for_reading
from gradwatch.spool.format import SpoolLayout, default_home, parse_rank_file
from gradwatch.spool.proc import judges_pid, process_alive
from gradwatch.spool.reader import SpoolFormatError, read_all_records, read_meta
from gradwatch.spool.records import (
    AckRecord,
    CheckpointRecord,
    EndRecord,
    LayersRecord,
    LogRecord,
    NonFiniteRecord,
    Record,
    ResumeRecord,
    RunMeta,
    StepRecord,
    merge_logged,
)

MAX_EVENTS_BYTES = 256 * 2**20  # an events file beyond this is read up to it


class RunNotFound(GradwatchError, LookupError):
    """No run of that name in the spool; the message lists the runs there are."""


@dataclass
class RankHistory:
    """One rank's records, in the order they were written."""

    rank: int
    meta: RunMeta
    records: list[Record]
    size_bytes: int = 0

    @property
    def steps(self) -> list[StepRecord]:
        """The run's steps (its first optimizer's), each with the scalars logged right after it in ``values``."""
        return [r for r in self.records if isinstance(r, StepRecord) and not r.opt]

    def optimizer_steps(self, optimizer: str) -> list[StepRecord]:
        """The steps of another optimizer of the run ("1", "2"...: docs/attaching.md, "Several optimizers")."""
        return [r for r in self.records if isinstance(r, StepRecord) and r.opt == optimizer]

    @property
    def logs(self) -> list[LogRecord]:
        """Scalars logged where they joined no step's record (before the first step, or late)."""
        return [r for r in self.records if isinstance(r, LogRecord)]

    @property
    def actions(self) -> list[AckRecord]:
        """What the probe did with the agent's commands: applied, late or rejected, after which step."""
        return [r for r in self.records if isinstance(r, AckRecord)]

    @property
    def layers(self) -> list[LayersRecord]:
        return [r for r in self.records if isinstance(r, LayersRecord)]

    @property
    def nonfinite(self) -> list[NonFiniteRecord]:
        """Where non-finite values came from: gradients named at the bad step, the forward check after it."""
        return [r for r in self.records if isinstance(r, NonFiniteRecord)]

    @property
    def checkpoints(self) -> list[CheckpointRecord]:
        return [r for r in self.records if isinstance(r, CheckpointRecord)]

    @property
    def resumes(self) -> list[ResumeRecord]:
        return [r for r in self.records if isinstance(r, ResumeRecord)]

    @property
    def end(self) -> EndRecord | None:
        """The last process's end record; None while the run is going (or its process was killed)."""
        last = next((r for r in reversed(self.records) if isinstance(r, (EndRecord, ResumeRecord))), None)
        return last if isinstance(last, EndRecord) else None

    def scalar(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of every recording of a logged scalar (``loss``, ``val_loss``...), in order."""
        out = []
        for record in self.records:
            own_step = isinstance(record, StepRecord) and not record.opt
            if (own_step or isinstance(record, LogRecord)) and record.values and name in record.values:  # type: ignore[union-attr]
                out.append((record.step, record.values[name]))  # type: ignore[union-attr]
        return out

    @property
    def scalar_names(self) -> list[str]:
        names: dict[str, None] = {}
        for record in self.records:
            if isinstance(record, (StepRecord, LogRecord)) and record.values:
                names.update(dict.fromkeys(record.values))
        return list(names)

    @property
    def last_time(self) -> float | None:
        return self.records[-1].t if self.records else self.meta.start_time


@dataclass
class RunHistory:
    name: str
    path: Path
    ranks: dict[int, RankHistory]
    events: list[dict[str, Any]] = field(default_factory=list)  # the agent's, as written (docs/spool-format.md)
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> why it could not be read

    def rank(self, rank: int = 0) -> RankHistory:
        try:
            return self.ranks[rank]
        except KeyError:
            raise RunNotFound(f"run {self.name!r} has no rank {rank} (ranks: {sorted(self.ranks)})") from None

    @property
    def decisions(self) -> list[dict[str, Any]]:
        """Every firing of a rule on this run: what it saw, what it decided, whether it was sent."""
        return [e for e in self.events if e.get("event") == "decision"]

    @property
    def status(self) -> str:
        """The ranks' end status, the worst of them (failed, interrupted, stopped, finished); for a rank without an
        end record, ``running`` while its process lives, ``crashed`` when it is gone, ``unknown`` when this machine
        cannot tell (another host, another pid namespace)."""
        statuses = {self._rank_status(r) for r in self.ranks.values()} or {"unknown"}
        order = ["crashed", "failed", "running", "unknown", "interrupted", "stopped", "finished"]
        return next(s for s in order if s in statuses)

    @staticmethod
    def _rank_status(rank: RankHistory) -> str:
        end = rank.end
        if end is not None:
            return end.status.value
        meta = rank.meta
        if not judges_pid(meta.host, meta.pid, meta.pid_namespace, socket.gethostname()):
            return "unknown"
        return "crashed" if process_alive(meta.pid, meta.proc_start_ticks) is False else "running"

    @property
    def last_time(self) -> float | None:
        times = [t for r in self.ranks.values() if (t := r.last_time) is not None]
        return max(times) if times else None

    @property
    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.path.rglob("*") if path.is_file())


def _home(home: str | Path | None) -> SpoolLayout:
    return SpoolLayout(Path(home).expanduser() if home is not None else default_home())


def run_names(home: str | Path | None = None) -> list[str]:
    """The runs in the spool, by name."""
    runs_dir = _home(home).runs_dir
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink())


def run_directory(name: str, home: str | Path | None = None) -> Path:
    """The directory of run ``name``; RunNotFound, naming the runs there are, when there is none of that name."""
    layout = _home(home)
    run_dir = layout.run_dir(name)
    if not run_dir.is_dir() or run_dir.is_symlink() or "/" in name or name in ("", ".", ".."):
        known = run_names(home)
        hint = f"runs there: {', '.join(known[:20])}" + (" ..." if len(known) > 20 else "") if known else "it is empty"
        raise RunNotFound(f"no run {name!r} in {layout.runs_dir} ({hint})")
    return run_dir


def read_run(name: str, home: str | Path | None = None) -> RunHistory:
    """Everything recorded of run ``name`` (``home``: the spool, default ``$GRADWATCH_HOME``). RunNotFound, naming
    the runs there are, when there is none of that name. A rank whose files cannot be read is left out and named
    in ``unreadable``; a line that is not a valid record is skipped, as the agent skips it."""
    run_dir = run_directory(name, home)
    history = RunHistory(name=name, path=run_dir, ranks={})
    for path in sorted(run_dir.iterdir()):
        parsed = parse_rank_file(path.name)
        if parsed is None or parsed[1] != "meta.json":
            continue
        rank = parsed[0]
        try:
            meta = read_meta(path)
            records_path = SpoolLayout.records_file(run_dir, rank)
            records = merge_logged(read_all_records(records_path)) if records_path.is_file() else []
            size = records_path.stat().st_size if records_path.is_file() else 0
        except (OSError, SpoolFormatError) as exc:
            history.unreadable[path.name] = str(exc)
            continue
        history.ranks[rank] = RankHistory(rank, meta, records, size)
    history.events = _read_events(SpoolLayout.events_file(run_dir), history.unreadable)
    return history


def _read_events(path: Path, unreadable: dict[str, str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        with open_for_reading(path) as f:
            text = f.read(MAX_EVENTS_BYTES).decode("utf-8", "replace")
    except OSError as exc:
        unreadable[path.name] = str(exc)
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a torn last line, or not ours
        if isinstance(event, dict):
            events.append(event)
    return events


def iter_runs(home: str | Path | None = None) -> Iterator[RunHistory]:
    """Every run of the spool, read (``gradwatch runs ls``)."""
    for name in run_names(home):
        try:
            yield read_run(name, home)
        except RunNotFound:  # removed while we looked
            continue


def age_seconds(run: RunHistory, now: float | None = None) -> float | None:
    """Seconds since the run's last record (its start, without one)."""
    last = run.last_time
    return None if last is None else max(0.0, (time.time() if now is None else now) - last)
