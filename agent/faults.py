"""One run's problem stays that run's: the agent's per-run failures, kept, backed off and reported once.

Every per-run step of the agent (reading its files, deciding its state, its alerts, its scrape series)
runs under :meth:`RunFaults.guard`. A run whose step raises is skipped for that step (the other runs are
served), retried with a growing backoff, reported with one log line per episode (not one traceback per
tick), counted (``gradwatch_agent_run_faults_total{stage}``), shown as faulty
(``gradwatch_agent_runs_faulty{stage}``) and in ``/api/runs`` until the step works again.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("gradwatch.agent")

FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0
MAX_MESSAGE = 300


class Stage(str, enum.Enum):
    """The agent's per-run steps."""

    INGEST = "ingest"  # reading the run's files into its state
    FILES = "files"  # a FIFO, a device or a directory in a rank file's place: never opened
    STUCK = "stuck"  # a records file that makes no progress (a line never completed, or over the size limit)
    RULES = "rules"  # a rule whose detector failed on the run's values (disabled for that run)
    REFRESH = "refresh"  # deciding the run's state (running, stalled, crashed...)
    ALERTS = "alerts"  # the run's alert conditions
    COLLECT = "collect"  # the run's series at scrape time


@dataclass
class Fault:
    run: str
    stage: Stage
    message: str
    since: float  # monotonic seconds
    count: int = 1
    retry_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage.value, "message": self.message, "failures": self.count}


class RunFaults:
    """The open fault episodes by (run, stage), and how many failures each stage has had in all."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock  # monotonic
        self.lock = threading.Lock()  # the scrape thread reports collection faults
        self.open: dict[tuple[str, Stage], Fault] = {}
        self.totals: dict[Stage, int] = dict.fromkeys(Stage, 0)

    def failed(self, run: str, stage: Stage, message: str, *, backoff: bool = True) -> None:
        """One failure of ``stage`` for ``run``: the first of an episode is logged, later ones only counted."""
        message = message[:MAX_MESSAGE]
        now = self.clock()
        with self.lock:
            self.totals[stage] += 1
            fault = self.open.get((run, stage))
            if fault is None:
                fault = self.open[(run, stage)] = Fault(run, stage, message, now)
                first = True
            else:
                fault.count += 1
                fault.message = message
                first = False
            delay = min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** min(fault.count - 1, 16))
            fault.retry_at = now + delay if backoff else now
        if first:
            log.warning("run %s: %s: %s (other runs are not affected; reported once until it recovers)", run,
                        stage.value, message)

    def recovered(self, run: str, stage: Stage) -> None:
        if not self.open or (run, stage) not in self.open:  # the common case: no lock taken, no key hashed
            return
        with self.lock:
            fault = self.open.pop((run, stage), None)
        if fault is not None:
            log.info("run %s: %s works again after %d failure(s)", run, stage.value, fault.count)

    def backing_off(self, run: str, stage: Stage) -> bool:
        """Whether ``run``'s ``stage`` failed recently and waits before it is tried again."""
        fault = self.open.get((run, stage)) if self.open else None
        return fault is not None and self.clock() < fault.retry_at

    @contextmanager
    def guard(self, run: str, stage: Stage) -> Iterator[None]:
        """Run one per-run step: an exception in it is this run's fault, never the caller's."""
        try:
            yield
        except Exception as exc:  # one run's failure must not cost the others: kept, reported, retried later
            self.failed(run, stage, f"{type(exc).__name__}: {exc}")
        else:
            self.recovered(run, stage)

    def forget(self, run: str) -> None:
        with self.lock:
            for key in [k for k in self.open if k[0] == run]:
                del self.open[key]

    def of_run(self, run: str) -> list[dict[str, Any]]:
        with self.lock:
            return [f.to_json() for (r, _), f in sorted(self.open.items(), key=lambda kv: kv[0][1].value) if r == run]

    def faulty_by_stage(self) -> dict[Stage, int]:
        counts = dict.fromkeys(Stage, 0)
        with self.lock:
            for _, stage in self.open:
                counts[stage] += 1
        return counts
