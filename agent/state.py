"""What the agent knows about every run: built from records, read at scrape time.

Deciding a run's state (running, stalled, crashed, finished) is separate from ingesting
records, and everything here can be saved and restored (``state_dict``/``load_state_dict``),
so a restarted agent goes on exactly where it stopped.
"""

from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from gradwatch.agent.detectors import RecentMax
from gradwatch.agent.rules import AgentRules
from gradwatch.rules.config import default_rules
from gradwatch.rules.detectors import EmaZScore
from gradwatch.spool.proc import process_alive

MAX_METRIC_NAMES = 64  # per rank; bounds the cardinality of gradwatch_metric{name=...}
SPIKE_METRICS = ("loss", "grad_norm")
NONFINITE_QUANTITIES = ("loss", "grad_norm", "metric")
MAX_LAYERS = 10_000  # per rank; layer statistics beyond this many layers are not kept
CUDA_MEMORY_FIELDS = ("allocated", "reserved", "peak", "total")


class RunStatus(str, enum.Enum):
    RUNNING = "running"
    STALLED = "stalled"  # no record for stall_after seconds, process not known to be gone
    CRASHED = "crashed"  # process gone without finishing, or closed with an exception
    FINISHED = "finished"

    @property
    def ended(self) -> bool:
        return self in (RunStatus.CRASHED, RunStatus.FINISHED)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class RankState:
    """One process (one rank) of a run."""

    run: str
    rank: int
    meta: dict[str, Any]
    spike_window: float
    offset: int = 0  # bytes of the records file already applied
    steps_total: int = 0
    records: int = 0
    last_step_time: float | None = None
    last_record_time: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    learning_rates: list[float] = field(default_factory=list)
    step_duration: float | None = None
    step_duration_ema: float | None = None  # smoothed, for the pace of the run (command lead)
    data_wait: float | None = None
    samples_per_second: float | None = None
    samples_total: float = 0.0
    probe_dropped: int = 0
    nonfinite: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NONFINITE_QUANTITIES, 0))
    spikes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPIKE_METRICS, 0))
    metrics: dict[str, float] = field(default_factory=dict)
    metric_names_dropped: int = 0
    actions: dict[str, int] = field(default_factory=dict)  # "action:reason" -> times carried out by this rank
    commands_late: int = 0
    clip_threshold: float | None = None
    clipped_steps: int = 0
    guarded_steps: int = 0  # steps with a clipping threshold in force
    would_skip: int = 0  # steps a skip guard in observe mode would have skipped
    recent_actions: list[dict[str, Any]] = field(default_factory=list)  # newest last, at most 10
    layer_grad_norms: dict[str, float] = field(default_factory=dict)  # from the newest layers record
    layer_update_ratios: dict[str, float] = field(default_factory=dict)  # newest value of each layer
    layers_step: int | None = None
    cuda_memory: dict[str, float] = field(default_factory=dict)  # CUDA allocator: allocated, reserved, peak, total
    end_status: str | None = None  # "finished" | "stopped" | "failed" from the end record
    end_error: str | None = None
    status: RunStatus = RunStatus.RUNNING
    ended_at: float | None = None

    def __post_init__(self) -> None:
        self.detectors = {name: EmaZScore() for name in SPIKE_METRICS}
        self.recent_max = {name: RecentMax(self.spike_window) for name in SPIKE_METRICS}

    # -- records ---------------------------------------------------------------------------------
    def apply(self, record: dict[str, Any]) -> None:
        t = float(record["t"])
        self.records += 1
        self.last_record_time = t if self.last_record_time is None else max(self.last_record_time, t)
        dropped = record.get("dropped")
        if isinstance(dropped, int):
            self.probe_dropped = max(self.probe_dropped, dropped)
        kind = record["kind"]
        if kind == "step":
            self._apply_step(record, t)
            if "values" in record:  # the scalars logged right after this step, merged by the probe
                self._apply_log(record, t)
        elif kind == "log":
            self._apply_log(record, t)
        elif kind == "end":
            status = record.get("status")
            self.end_status = status if status in ("finished", "stopped") else "failed"
            self.end_error = record.get("error")
            self.steps_total = max(self.steps_total, record["step"])
        elif kind == "ack":
            self._apply_ack(record)
        elif kind == "layers":
            self._apply_layers(record)

    def _apply_layers(self, record: dict[str, Any]) -> None:
        names, norms, ratios = record.get("layers"), record.get("grad_norm"), record.get("update_ratio")
        if isinstance(names, list) and isinstance(norms, list):
            self.layer_grad_norms = {str(name): v for name, v in zip(names[:MAX_LAYERS], map(_number, norms))
                                     if v is not None}
        if isinstance(ratios, dict):
            for name, ratio in ratios.items():
                value = _number(ratio)
                if value is not None and (name in self.layer_update_ratios or len(self.layer_update_ratios) < MAX_LAYERS):
                    self.layer_update_ratios[str(name)] = value
        self.layers_step = record["step"]

    def _count_action(self, action: str, reason: str, step: int, detail: str) -> None:
        key = f"{action}:{reason}"
        self.actions[key] = self.actions.get(key, 0) + 1
        self._remember(action, reason, step, detail)

    def _remember(self, action: str, reason: str, step: int, detail: str) -> None:
        """Keep the 10 newest actions for `gradwatch status`; consecutive steps of one kind are one entry."""
        last = self.recent_actions[-1] if self.recent_actions else None
        if last and (last["action"], last["reason"]) == (action, reason) and step == last["to_step"] + 1:
            last["to_step"], last["count"] = step, last["count"] + 1  # a run of skipped steps
            return
        self.recent_actions = (self.recent_actions + [{"step": step, "to_step": step, "count": 1, "action": action,
                                                       "reason": reason, "detail": detail}])[-10:]

    def _apply_ack(self, record: dict[str, Any]) -> None:
        status = record.get("status")
        action, detail = str(record.get("action")), str(record.get("detail") or "")
        if status == "late":
            self.commands_late += 1
        if status in ("applied", "late"):
            self._count_action(action, str(record.get("reason") or "command"), record["step"], detail)
        else:
            self._remember(action, "rejected", record["step"], detail)

    def _apply_step(self, record: dict[str, Any], t: float) -> None:
        # The probe numbers steps itself: the count stays exact even if some records were dropped.
        self.steps_total = max(self.steps_total, record["step"])
        self.last_step_time = t
        norm = _number(record.get("grad_norm"))
        if norm is not None:
            self._observe("grad_norm", norm, t)
            self.grad_norm = norm
        lrs = record.get("lr")
        if isinstance(lrs, list):
            self.learning_rates = [v for v in (_number(lr) for lr in lrs) if v is not None]
        self.step_duration = _number(record.get("dur"))
        if self.step_duration and self.step_duration > 0:
            ema = self.step_duration_ema
            self.step_duration_ema = self.step_duration if ema is None else ema + 0.1 * (self.step_duration - ema)
        self.data_wait = _number(record.get("wait"))
        threshold = _number(record.get("clip"))
        if threshold is not None:
            self.clip_threshold = threshold
            self.guarded_steps += 1
            self.clipped_steps += bool(record.get("clipped"))
        skip = record.get("skip")
        if isinstance(skip, str):
            self._count_action("skip_step", skip, record["step"], "update skipped")
        self.would_skip += isinstance(record.get("would_skip"), str)
        memory = record.get("cuda_mem")
        if isinstance(memory, dict):
            self.cuda_memory = {k: v for k in CUDA_MEMORY_FIELDS if (v := _number(memory.get(k))) is not None}

    def _apply_log(self, record: dict[str, Any], t: float) -> None:
        values = record.get("values")
        if not isinstance(values, dict):
            return
        for name, raw in values.items():
            value = _number(raw)
            if value is None:
                continue
            if name == "loss":
                self._observe("loss", value, t)
                self.loss = value
            elif name == "batch_size":
                self.samples_total += value
                if self.step_duration:
                    self.samples_per_second = value / self.step_duration
            if name != "loss":
                if not math.isfinite(value):
                    self.nonfinite["metric"] += 1
                if name in self.metrics or len(self.metrics) < MAX_METRIC_NAMES:
                    self.metrics[name] = value
                else:
                    self.metric_names_dropped += 1

    def _observe(self, quantity: str, value: float, t: float) -> None:
        if not math.isfinite(value):
            self.nonfinite[quantity] += 1
        elif self.detectors[quantity].update(value):
            self.spikes[quantity] += 1
        self.recent_max[quantity].add(t, value)

    @property
    def clipped_fraction(self) -> float | None:
        return self.clipped_steps / self.guarded_steps if self.guarded_steps else None

    # -- deciding the state ------------------------------------------------------------------
    def refresh_status(self, now: float, stall_after: float, local_host: str) -> RunStatus:
        if self.status.ended:
            return self.status
        if self.end_status is not None:
            self._end(RunStatus.CRASHED if self.end_status == "failed" else RunStatus.FINISHED, now)
        elif self.meta.get("host") == local_host and process_alive(
            int(self.meta["pid"]), self.meta.get("proc_start_ticks")
        ) is False:
            self._end(RunStatus.CRASHED, now)
        else:
            last = self.last_record_time or float(self.meta.get("start_time", now))
            self.status = RunStatus.STALLED if now - last > stall_after else RunStatus.RUNNING
        return self.status

    def _end(self, status: RunStatus, now: float) -> None:
        self.status = status
        self.ended_at = now

    # -- persistence -----------------------------------------------------------------------------
    _PLAIN_FIELDS = (
        "offset", "steps_total", "records", "last_step_time", "last_record_time", "loss", "grad_norm",
        "learning_rates", "step_duration", "step_duration_ema", "data_wait", "samples_per_second", "samples_total",
        "probe_dropped",
        "nonfinite", "spikes", "metrics", "metric_names_dropped", "end_status", "end_error", "ended_at",
        "actions", "commands_late", "clip_threshold", "clipped_steps", "guarded_steps", "would_skip",
        "recent_actions", "layer_grad_norms", "layer_update_ratios", "layers_step", "cuda_memory",
    )

    def state_dict(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self._PLAIN_FIELDS}
        state["status"] = self.status.value
        state["detectors"] = {k: d.state_dict() for k, d in self.detectors.items()}
        state["recent_max"] = {k: m.state_dict() for k, m in self.recent_max.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._PLAIN_FIELDS:
            if name in state:
                setattr(self, name, state[name])
        self.status = RunStatus(state.get("status", RunStatus.RUNNING.value))
        for key, detector in self.detectors.items():
            detector.load_state_dict(state.get("detectors", {}).get(key, {}))
        for key, recent in self.recent_max.items():
            recent.load_state_dict(state.get("recent_max", {}).get(key, []))


def run_status(ranks: list[RankState]) -> RunStatus:
    """A run is crashed if any rank crashed, stalled if any stalled, finished when all finished."""
    statuses = {r.status for r in ranks}
    for status in (RunStatus.CRASHED, RunStatus.STALLED, RunStatus.RUNNING):
        if status in statuses:
            return status
    return RunStatus.FINISHED


@dataclass
class AgentCounters:
    """The agent's own health, exported as gradwatch_agent_*."""

    records_ingested: int = 0
    records_rejected: dict[str, int] = field(default_factory=dict)
    rescans: int = 0
    handler_errors: int = 0
    watcher_restarts: int = 0
    ingest_lag_seconds: float | None = None

    def reject(self, reason: str, n: int = 1) -> None:
        self.records_rejected[reason] = self.records_rejected.get(reason, 0) + n


class AgentState:
    """All runs, behind one lock shared by the ingest loop and the scrape."""

    def __init__(self, spike_window: float, rules: AgentRules | None = None) -> None:
        self.lock = threading.RLock()
        self.rules = rules if rules is not None else AgentRules(default_rules(), None)
        self.spike_window = spike_window
        self.runs: dict[str, dict[int, RankState]] = {}
        self.retired: set[str] = set()  # runs whose series were dropped after they ended
        self.rejected_runs: dict[str, str] = {}  # run -> why its metadata was refused
        self.counters = AgentCounters()

    def rank(self, run: str, rank: int) -> RankState | None:
        return self.runs.get(run, {}).get(rank)

    def add_rank(self, run: str, rank: int, meta: dict[str, Any]) -> RankState:
        state = RankState(run=run, rank=rank, meta=meta, spike_window=self.spike_window)
        self.runs.setdefault(run, {})[rank] = state
        self.rejected_runs.pop(run, None)
        return state

    def refresh(self, now: float, stall_after: float, ended_ttl: float, local_host: str) -> list[str]:
        """Decide every rank's state; retire runs ended for longer than ``ended_ttl``. Returns retired runs."""
        retired = []
        for run, ranks in list(self.runs.items()):
            for state in ranks.values():
                state.refresh_status(now, stall_after, local_host)
            if all(s.status.ended for s in ranks.values()):
                ended_at = max(s.ended_at or now for s in ranks.values())
                if now - ended_at > ended_ttl:
                    del self.runs[run]
                    self.rules.forget(run)
                    self.retired.add(run)
                    retired.append(run)
        return retired

    def forget_missing(self, present: set[str]) -> None:
        """Runs whose directory was deleted: drop them and their tombstones."""
        for run in list(self.runs):
            if run not in present:
                del self.runs[run]
                self.rules.forget(run)
        self.retired &= present
        for run in list(self.rejected_runs):
            if run not in present:
                del self.rejected_runs[run]

    def state_dict(self) -> dict[str, Any]:
        return {
            "runs": {run: {str(r): s.state_dict() | {"meta": s.meta} for r, s in ranks.items()}
                     for run, ranks in self.runs.items()},
            "retired": sorted(self.retired),
            "rules": self.rules.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.runs.clear()
        for run, ranks in state.get("runs", {}).items():
            for rank, rank_state in ranks.items():
                self.add_rank(run, int(rank), rank_state["meta"]).load_state_dict(rank_state)
        self.retired = set(state.get("retired", []))
        self.rules.load_state_dict(state.get("rules", {}))

    def runs_by_status(self) -> dict[RunStatus, int]:
        """How many runs are in each state (a run's state is that of its worst rank)."""
        counts = dict.fromkeys(RunStatus, 0)
        for ranks in self.runs.values():
            counts[run_status(list(ranks.values()))] += 1
        return counts

    def summary(self, now: float) -> list[dict[str, Any]]:
        """The JSON list of runs served at /api/runs and shown by ``gradwatch status``."""
        out = []
        for run, ranks in sorted(self.runs.items()):
            states = [ranks[r] for r in sorted(ranks)]
            first = states[0]
            rules = self.rules.runs.get(run)
            out.append({
                "run": run,
                "status": run_status(states).value,
                "world_size": first.meta.get("world_size"),
                "host": first.meta.get("host"),
                "start_time": first.meta.get("start_time"),
                "labels": first.meta.get("labels", {}),
                "rules": None if rules is None else {
                    "source": rules.source, "dry_run": rules.config.dry_run,
                    "acting": [r.name for r in rules.config.rules if rules.config.acting(r)],
                    "recent_decisions": list(rules.recent),
                    "error": self.rules.run_rule_errors.get(run),
                },
                "ranks": [{
                    "rank": s.rank, "status": s.status.value, "pid": s.meta.get("pid"), "steps": s.steps_total,
                    "loss": s.loss, "grad_norm": s.grad_norm, "learning_rates": s.learning_rates,
                    "step_duration_seconds": s.step_duration, "data_wait_seconds": s.data_wait,
                    "samples_per_second": s.samples_per_second, "last_step_time": s.last_step_time,
                    "seconds_since_last_record": None if s.last_record_time is None else now - s.last_record_time,
                    "nonfinite": s.nonfinite, "spikes": s.spikes, "metrics": s.metrics,
                    "probe_dropped": s.probe_dropped, "error": s.end_error, "end_status": s.end_status,
                    "actions": s.actions, "recent_actions": s.recent_actions, "clip_threshold": s.clip_threshold,
                    "clipped_fraction": s.clipped_fraction, "commands_late": s.commands_late,
                } for s in states],
            })
        for run, reason in sorted(self.rejected_runs.items()):
            out.append({"run": run, "status": "rejected", "error": reason, "ranks": []})
        return out
