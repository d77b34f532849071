"""``gradwatch tail RUN``: a run's steps and events as the probe writes them, read from the spool (no agent).

Like ``tail -f``: the last few steps of each rank, then every new one, until every rank has ended (or Ctrl-C).
A step line has the step, rank, loss, gradient norm, learning rate, step time and the other scalars logged with
it; events (actions applied or refused, skipped updates, non-finite origins, spikes with their layer sample,
resumes, the end) have lines of their own. A run that steps faster than a terminal can be read prints the newest
step of each rank per interval, with how many it passed over; lines with other scalars (val_loss) always print.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gradwatch.history import run_directory
from gradwatch.spool.format import parse_rank_file
from gradwatch.spool.reader import read_records
from gradwatch.spool.records import (
    AckRecord,
    EndRecord,
    LayersRecord,
    LogRecord,
    NonFiniteRecord,
    Record,
    ResumeRecord,
    StepRecord,
)

POLL_SECONDS = 0.25
STEP_LINES_PER_POLL = 20  # per rank: more new steps than this in one interval print only the newest
_QUIET_VALUES = frozenset({"loss", "batch_size", "samples_per_second"})
_TAIL_BYTES_PER_STEP = 1024  # to start near the end: a step line is ~200 B, with scalars and events more


@dataclass
class _RankFile:
    path: Path
    offset: int = 0
    in_long_line: bool = False
    ended: bool = False


class RunTail:
    """Follows the records files of a run (every rank, or one): ``poll`` returns what was appended since."""

    def __init__(self, run: str, home: str | Path | None = None, rank: int | None = None, last: int = 10) -> None:
        self.run_dir = run_directory(run, home)
        self.rank = rank
        self.last = last
        self.files: dict[int, _RankFile] = {}

    def _discover(self) -> None:
        for path in self.run_dir.iterdir():
            parsed = parse_rank_file(path.name)
            if parsed is None or parsed[1] != "records.jsonl" or parsed[0] in self.files:
                continue
            if self.rank is not None and parsed[0] != self.rank:
                continue
            self.files[parsed[0]] = self._start(path)

    def _start(self, path: Path) -> _RankFile:
        """Near the end: the last ``last`` steps or so (the first line read from there may be cut: skipped)."""
        size = path.stat().st_size
        offset = max(0, size - max(self.last, 1) * _TAIL_BYTES_PER_STEP)
        return _RankFile(path, offset, in_long_line=offset > 0)

    def poll(self) -> list[tuple[int, Record]]:
        self._discover()
        out: list[tuple[int, Record]] = []
        for rank, f in sorted(self.files.items()):
            while True:
                result = read_records(f.path, f.offset, in_long_line=f.in_long_line)
                f.offset, f.in_long_line = result.offset, result.in_long_line
                for record in result.records:
                    if isinstance(record, EndRecord):
                        f.ended = True
                    elif isinstance(record, ResumeRecord):
                        f.ended = False
                    out.append((rank, record))
                if result.at_end:
                    break
        return out

    @property
    def ended(self) -> bool:
        return bool(self.files) and all(f.ended for f in self.files.values())


def _num(value: float | None, fmt: str = ".4g") -> str:
    if value is None:
        return "-"
    return f"{value:{fmt}}" if math.isfinite(value) else str(value)


def step_line(rank: int, s: StepRecord, passed: int = 0) -> str:
    values = s.values or {}
    extra = " ".join(f"{k} {_num(v)}" for k, v in values.items() if k not in _QUIET_VALUES)
    lr = _num(s.lr[0], ".3g") if s.lr else "-"
    parts = [f"step {s.step:>7}", f"r{rank}", f"loss {_num(values.get('loss')):<10}",
             f"grad {_num(s.grad_norm, '.3g'):<9}", f"lr {lr:<9}",
             f"{s.dur * 1000:7.1f} ms" if s.dur is not None else f"{'-':>7} ms"]
    if s.clipped and s.clip is not None:
        parts.append(f"clipped at {_num(s.clip, '.3g')}")
    if s.skip:
        parts.append(f"update skipped ({s.skip})")
    if s.opt:
        parts.insert(2, f"optimizer {s.opt}")
    if extra:
        parts.append(extra)
    if passed:
        parts.append(f"(+{passed} steps)")
    return "  ".join(parts)


def event_line(rank: int, record: Record) -> str | None:
    where = f"step {record.step:>7}  r{rank}"
    if isinstance(record, AckRecord):
        return f"{where}  ACTION {record.action} {record.status.value}" + \
            (f" ({record.rule}: {record.reason})" if record.rule else "") + (f": {record.detail}" if record.detail else "")
    if isinstance(record, NonFiniteRecord):
        return f"{where}  NON-FINITE {record.text()}"
    if isinstance(record, LayersRecord) and record.trigger:
        ranked = sorted(((n, layer) for layer, n in zip(record.layers, record.grad_norm, strict=False)
                         if n is not None), reverse=True)[:3]
        top = ", ".join(f"`{layer}` {_num(n, '.3g')}" for n, layer in ranked)
        return f"{where}  SPIKE ({record.trigger.partition(':')[2]}): largest layer gradient norms {top}"
    if isinstance(record, ResumeRecord):
        return f"{where}  RESUMED after step {record.step}" + (f" from checkpoint {record.checkpoint}"
                                                                if record.checkpoint else "")
    if isinstance(record, EndRecord):
        code = f", exit status {record.exit_code}" if record.exit_code is not None else ""
        error = f": {record.error[:200]}" if record.error else ""
        return f"{where}  ENDED {record.status.value}{code}{error}"
    return None


def lines(batch: list[tuple[int, Record]], per_rank: int = STEP_LINES_PER_POLL) -> Iterator[str]:
    """The lines of one poll's records, in order: every event; steps thinned to the newest when a rank wrote
    more than ``per_rank`` of them (a step with scalars other than the loss always prints)."""
    steps_by_rank: dict[int, int] = {}
    for rank, record in batch:
        if isinstance(record, StepRecord):
            steps_by_rank[rank] = steps_by_rank.get(rank, 0) + 1
    passed: dict[int, int] = {}
    seen: dict[int, int] = {}
    for rank, record in batch:
        if isinstance(record, StepRecord):
            seen[rank] = seen.get(rank, 0) + 1
            total = steps_by_rank[rank]
            newest = seen[rank] == total
            telling = any(k not in _QUIET_VALUES for k in (record.values or {})) or record.skip
            if total <= per_rank or newest or telling:
                yield step_line(rank, record, passed.pop(rank, 0))
            else:
                passed[rank] = passed.get(rank, 0) + 1
        elif isinstance(record, LogRecord):
            if record.values:
                yield f"step {record.step:>7}  r{rank}  " + " ".join(f"{k} {_num(v)}" for k, v in record.values.items())
        else:
            line = event_line(rank, record)
            if line is not None:
                yield line


def follow(tail: RunTail, echo: Callable[[str], object], *, keep_following: bool = True,
           poll_seconds: float = POLL_SECONDS) -> None:
    """Print the tail, then (``keep_following``) what comes, until every rank has ended."""
    first = tail.poll()
    steps = [i for i, (_, r) in enumerate(first) if isinstance(r, StepRecord)]
    wanted = tail.last * max(len(tail.files), 1)  # the last steps of every rank, and the events among them
    keep_from = len(first) if wanted == 0 else steps[-wanted] if len(steps) > wanted else 0
    for line in lines(first[keep_from:], per_rank=max(tail.last, 1)):
        echo(line)
    while keep_following and not tail.ended:
        time.sleep(poll_seconds)
        for line in lines(tail.poll()):
            echo(line)
