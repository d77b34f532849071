"""Write spool files by hand (as a probe would) to build agent scenarios without torch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.records import (
    EndRecord,
    EndStatus,
    LogRecord,
    Record,
    RunMeta,
    StepRecord,
    decode,
    encode,
    meta_to_json,
)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SpoolBuilder:
    """Writes run spools through the record contract (gradwatch.spool.records), as a probe would."""

    def __init__(self, home: Path) -> None:
        self.layout = SpoolLayout(home)
        self.seq: dict[tuple[str, int], int] = {}

    def start(self, run: str, rank: int = 0, world_size: int = 1, t: float = 1_000_000.0,
              **meta: Any) -> Path:
        run_dir = self.layout.run_dir(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        body = meta_to_json(RunMeta(run=run, rank=rank, world_size=world_size, format_version="1.0", host="elsewhere",
                                    pid=os.getpid(), start_time=t))
        SpoolLayout.meta_file(run_dir, rank).write_text(json.dumps({**body, **meta}))
        SpoolLayout.records_file(run_dir, rank).touch()
        return run_dir

    def append(self, run: str, rank: int, *records: Record | dict[str, Any]) -> None:
        """Append records; a dict is a line's object and goes through the contract's decoder first."""
        path = SpoolLayout.records_file(self.layout.run_dir(run), rank)
        with open(path, "ab") as f:
            for item in records:
                record = decode(item) if isinstance(item, dict) else item
                assert record is not None, f"not a record kind this version knows: {item!r}"
                key = (run, rank)
                self.seq[key] = self.seq.get(key, 0) + 1
                record.seq = self.seq[key]
                f.write(encode(record))

    def steps(self, run: str, rank: int, first: int, last: int, t0: float = 1_000_000.0, loss: float = 1.0,
              batch_size: int = 8, nan_every: int = 0) -> None:
        """Steps first..last, each a step record (norm, lr, 0.1 s) and a log record (loss, batch_size)."""
        records: list[Record] = []
        for step in range(first, last + 1):
            t = t0 + step * 0.1
            records.append(StepRecord(step=step, t=t, grad_norm=2.0, lr=[0.1, 0.01], dur=0.1, wait=0.02))
            value = math.nan if nan_every and step % nan_every == 0 else loss
            records.append(LogRecord(step=step, t=t, values={"loss": value, "batch_size": batch_size}))
        self.append(run, rank, *records)

    def end(self, run: str, rank: int, step: int, status: str = "finished", t: float = 1_000_100.0) -> None:
        self.append(run, rank, EndRecord(step=step, t=t, status=EndStatus(status)))
