"""What the agent knows about every run: built from records, read at scrape time.

Deciding a run's state (running, stalled, crashed, finished) is separate from ingesting
records, and everything here can be saved and restored (``state_dict``/``load_state_dict``),
so a restarted agent goes on exactly where it stopped.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

from gradwatch.agent.faults import RunFaults, Stage
from gradwatch.agent.recent_max import RecentMax
from gradwatch.agent.rules import AgentRules
from gradwatch.rules.config import default_rules
from gradwatch.rules.detector_base import TickObservation
from gradwatch.rules.ema import EmaZScore
from gradwatch.rules.engine import Decision
from gradwatch.spool.proc import judges_pid, process_alive
from gradwatch.spool.records import (
    AckRecord,
    AckStatus,
    EndRecord,
    LayersRecord,
    LogRecord,
    NonFiniteRecord,
    Record,
    ResumeRecord,
    RunMeta,
    StepRecord,
    decode_meta,
    meta_to_json,
)

log = logging.getLogger("gradwatch.agent")
MAX_METRIC_NAMES = 64  # per rank; bounds the cardinality of gradwatch_metric{name=...}
SPIKE_METRICS = ("loss", "grad_norm")
NONFINITE_QUANTITIES = ("loss", "grad_norm", "metric")
MAX_LAYERS = 10_000  # per rank; layer statistics beyond this many layers are not kept
CUDA_MEMORY_FIELDS = ("allocated", "reserved", "peak", "total")
MAX_OPTIMIZERS = 16  # other optimizers of one rank with series of their own
PROCESS_CHECK_SECONDS = 2.0  # a crash is seen at most this late (the loop looks every 0.5 s)


class RunStatus(str, enum.Enum):
    RUNNING = "running"
    STALLED = "stalled"  # no record for stall_after seconds, process not known to be gone
    CRASHED = "crashed"  # process gone without finishing, or closed with an exception
    FAILED = "failed"  # the script exited with a non-zero status (sys.exit(3))
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM (a person, or a scheduler's preemption)
    FINISHED = "finished"

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = frozenset({RunStatus.CRASHED, RunStatus.FAILED, RunStatus.INTERRUPTED, RunStatus.FINISHED})


SPIKE_SAMPLE_LAYERS = 3  # layers an on-trigger sample names: the ones that moved most


def spike_sample(record: LayersRecord, usual: dict[str, float]) -> dict[str, Any]:
    """An on-trigger layer sample (a step the probe saw spike) as people read it: the layers whose gradient norm
    grew most against the last periodic sample (largest norms when there is none)."""
    norms = {name: v for name, v in zip(record.layers, record.grad_norm, strict=False) if v is not None}
    factors = {name: v / usual[name] for name, v in norms.items() if usual.get(name)}
    ranked = sorted(factors, key=factors.__getitem__, reverse=True) if factors else \
        sorted(norms, key=norms.__getitem__, reverse=True)
    parts = [f"`{name}` {norms[name]:.3g}" + (f" ({factors[name]:.3g}x its last sample)" if name in factors else "")
             for name in ranked[:SPIKE_SAMPLE_LAYERS]]
    quantity = record.trigger.partition(":")[2] or "loss"
    return {"step": record.step, "quantity": quantity,
            "text": f"step {record.step}: layer gradient norms at the {quantity} spike: " + ", ".join(parts)}


@dataclass
class RankState:
    """One process (one rank) of a run."""

    run: str
    rank: int
    meta: RunMeta
    spike_window: float
    offset: int = 0  # bytes of the records file already applied
    steps_total: int = 0
    last_step: int | None = None  # the step of the newest step record
    records: int = 0
    last_step_time: float | None = None
    last_record_time: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    learning_rates: list[float] = field(default_factory=list)
    step_duration: float | None = None
    step_seconds_total: float = 0.0  # the steps' durations, summed (a counter PromQL can rate)
    data_wait_seconds_total: float = 0.0
    step_duration_ema: float | None = None  # smoothed, for the pace of the run (command lead)
    data_wait: float | None = None
    samples_per_second: float | None = None
    samples_total: float = 0.0
    probe_dropped: int = 0
    nonfinite: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NONFINITE_QUANTITIES, 0))
    spikes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPIKE_METRICS, 0))
    metrics: dict[str, float] = field(default_factory=dict)
    metric_names_dropped: int = 0  # logged names beyond MAX_METRIC_NAMES: their values are not kept
    values_unreadable: int = 0  # logged values the probe could not read (its count: values_dropped)
    values_unreadable_before_resume: int = 0
    actions: dict[str, int] = field(default_factory=dict)  # "action:reason" -> times carried out by this rank
    commands_late: int = 0
    clip_threshold: float | None = None
    clipped_steps: int = 0
    guarded_steps: int = 0  # steps with a clipping threshold in force
    would_skip: int = 0  # steps a skip guard in observe mode would have skipped
    recent_actions: list[dict[str, Any]] = field(default_factory=list)  # newest last, at most 10
    nonfinite_origins: list[dict[str, Any]] = field(default_factory=list)  # newest last, at most 10 (nonfinite records)
    layer_grad_norms: dict[str, float] = field(default_factory=dict)  # from the newest layers record
    usual_layer_grad_norms: dict[str, float] = field(default_factory=dict)  # from the newest periodic one
    spike_samples: list[dict[str, Any]] = field(default_factory=list)  # newest last, at most 10 (layers + trigger)
    layer_update_ratios: dict[str, float] = field(default_factory=dict)  # newest value of each layer
    layers_step: int | None = None
    # the layers exported as series: the largest, kept while they stay among the 2 x TOP_LAYER_SERIES largest
    exported_grad_layers: list[str] = field(default_factory=list)
    exported_ratio_layers: list[str] = field(default_factory=list)
    cuda_memory: dict[str, float] = field(default_factory=dict)  # CUDA allocator: allocated, reserved, peak, total
    # the run's other optimizers (a GAN's second network...), by name: steps, loss, grad_norm, lr of each
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    end_status: str | None = None  # "finished" | "stopped" | "failed" | "interrupted" from the end record
    end_error: str | None = None
    exit_code: int | None = None  # the non-zero status a failed script exited with
    status: RunStatus = RunStatus.RUNNING
    ended_at: float | None = None
    dropped_before_resume: int = 0  # what the processes before the last resume dropped (counts start again)
    resumes: int = 0  # times a new process continued this rank from a checkpoint (resume records)
    history: bool = False  # its newest records were read as history: written before this agent started, by a
    history_until: int = 0  # process already gone then (bytes of the file up to which records are history)
    # the rules' state at the run's checkpoints (rank 0), by checkpoint id, oldest first: a resume gets it back
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending_checkpoint: list[Any] | None = None  # [[ids], step]: taken once the records of that step are in
    # which files these are: a file replaced under the same name is another run's
    records_inode: int = 0
    meta_stamp: int = 0  # the metadata file's inode and modification time (rewritten by a resume, or a new run)
    in_long_line: bool = False  # the offset is inside a line over the size limit (skipped to its end)
    partial_at: list[float] | None = None  # [offset, size, since]: the file has ended mid-line since then
    process_checked_at: float = 0.0  # when the process was last looked for (not saved: looked at after a restart)

    def __post_init__(self) -> None:
        self.detectors = {name: EmaZScore() for name in SPIKE_METRICS}
        self.recent_max = {name: RecentMax(self.spike_window) for name in SPIKE_METRICS}

    # -- records ---------------------------------------------------------------------------------
    def apply(self, record: Record) -> dict[str, float]:
        """Take one record into the state; returns the observations it holds by metric name, for the
        rules (a metric of a rule file refers to these names)."""
        self.records += 1
        t = record.t
        self.last_record_time = t if self.last_record_time is None else max(self.last_record_time, t)
        self.probe_dropped = max(self.probe_dropped, self.dropped_before_resume + record.dropped)
        if record.__class__ is StepRecord or record.__class__ is LogRecord:
            self.values_unreadable = max(self.values_unreadable, self.values_unreadable_before_resume +
                                         record.values_dropped)
        if isinstance(record, StepRecord):
            if record.opt:  # for the rules that watch this optimizer (rule field `optimizer`)
                return self._apply_other_optimizer(record)
            observed = self._apply_step(record)
            if record.values is not None:  # the scalars logged right after this step, merged by the probe
                observed.update(self._apply_values(record.values, t, same_step=True))
            return observed
        if isinstance(record, LogRecord):
            # a log record right behind its step's record is that step's values, split by the writer's timing
            return self._apply_values(record.values, t, same_step=record.step == self.last_step)
        if isinstance(record, EndRecord):
            self.end_status = record.status.value
            self.end_error = record.error
            self.exit_code = record.exit_code
            self.steps_total = max(self.steps_total, record.step)
        elif isinstance(record, AckRecord):
            self._apply_ack(record)
        elif isinstance(record, LayersRecord):
            self._apply_layers(record)
        elif isinstance(record, NonFiniteRecord):
            origin = {"step": record.step, "source": record.source, "module": record.module, "value": record.value,
                      "count": record.count, "params": record.params[:8], "text": record.text()}
            self.nonfinite_origins = (self.nonfinite_origins + [origin])[-10:]
        return {}

    def resumed(self, record: ResumeRecord, meta: RunMeta | None) -> None:
        """A new process continues this rank after ``record.step`` (its metadata is ``meta``, when readable)."""
        if meta is not None:
            self.meta = meta
        self.resumes += 1
        self.dropped_before_resume = self.probe_dropped
        self.values_unreadable_before_resume = self.values_unreadable
        self.status, self.ended_at = RunStatus.RUNNING, None
        self.end_status = self.end_error = self.exit_code = None
        self.last_step = record.step
        self.step_duration = self.data_wait = None

    def _apply_layers(self, record: LayersRecord) -> None:
        self.layer_grad_norms = {name: v for name, v in zip(record.layers[:MAX_LAYERS], record.grad_norm, strict=False)
                                 if v is not None}
        if record.trigger:
            self.spike_samples = (self.spike_samples + [spike_sample(record, self.usual_layer_grad_norms)])[-10:]
        else:
            self.usual_layer_grad_norms = self.layer_grad_norms
        for name, ratio in record.update_ratio.items():
            if name in self.layer_update_ratios or len(self.layer_update_ratios) < MAX_LAYERS:
                self.layer_update_ratios[name] = ratio
        self.layers_step = record.step
        self.exported_grad_layers = stable_top(self.exported_grad_layers, self.layer_grad_norms)
        self.exported_ratio_layers = stable_top(self.exported_ratio_layers, self.layer_update_ratios)

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

    def _apply_ack(self, record: AckRecord) -> None:
        if record.status is AckStatus.LATE:
            self.commands_late += 1
        if record.status.carried_out:
            self._count_action(record.action, record.reason or "command", record.step, record.detail)
        else:
            self._remember(record.action, "not taken" if record.status is AckStatus.NOT_TAKEN else "rejected",
                           record.step, record.detail)

    def _apply_other_optimizer(self, record: StepRecord) -> dict[str, float]:
        """A step of another optimizer than the first: its own series (the run's steps are the first's);
        returns its observations (loss, grad_norm, lr, its other values)."""
        series = self.optimizers.get(record.opt)
        if series is None:
            if len(self.optimizers) >= MAX_OPTIMIZERS:
                return {}
            series = self.optimizers[record.opt] = {"steps": 0, "loss": None, "grad_norm": None, "lr": []}
        series["steps"] = max(series["steps"], record.step)
        series["grad_norm"] = record.grad_norm
        series["lr"] = list(record.lr)
        observed = dict(record.values or {})
        if "loss" in observed:
            series["loss"] = observed["loss"]
        if record.grad_norm is not None:
            observed["grad_norm"] = record.grad_norm
        if record.lr:
            observed["lr"] = record.lr[0]
        return observed

    def _apply_step(self, record: StepRecord) -> dict[str, float]:
        # The probe numbers steps itself: the count stays exact even if some records were dropped.
        t = record.t
        self.steps_total = max(self.steps_total, record.step)
        self.last_step = record.step
        self.last_step_time = t
        observed: dict[str, float] = {}
        norm = record.grad_norm
        if record.skip == "amp":
            # GradScaler found inf/NaN in the scaled gradients and skipped the update: its calibration, not a
            # divergence of the run (a healthy fp16 run has a few); counted as a skipped step, not as non-finite
            norm = None
        if norm is not None:
            self._observe("grad_norm", norm, t)
            self.grad_norm = observed["grad_norm"] = norm
        self.learning_rates = list(record.lr)
        if record.lr:
            observed["lr"] = record.lr[0]
        if record.skip is not None:  # the update was not made (a guard, GradScaler): its weights did not move
            observed["update_skipped"] = 1.0
        self.step_duration = duration = record.dur
        if duration is not None:
            observed["step_duration_seconds"] = duration
            if math.isfinite(duration) and duration >= 0:
                self.step_seconds_total += duration
        if duration and duration > 0:
            ema = self.step_duration_ema
            self.step_duration_ema = duration if ema is None else ema + 0.1 * (duration - ema)
            observed["steps_per_second"] = 1.0 / duration
        self.data_wait = record.wait
        if record.wait is not None:
            observed["data_wait_seconds"] = record.wait
            if math.isfinite(record.wait) and record.wait >= 0:
                self.data_wait_seconds_total += record.wait
        if record.clip is not None:
            self.clip_threshold = record.clip
            self.guarded_steps += 1
            self.clipped_steps += record.clipped
        if record.skip == "amp":
            scale = "" if record.loss_scale is None else f", loss scale {record.loss_scale:g}"
            self._count_action("skip_step", "amp", record.step, f"GradScaler skipped the update (inf/NaN gradients{scale})")
        elif record.skip is not None:
            self._count_action("skip_step", record.skip, record.step, "update skipped")
        self.would_skip += record.would_skip is not None
        if record.cuda_mem is not None:
            memory = record.cuda_mem
            self.cuda_memory = {k: v for k in CUDA_MEMORY_FIELDS if (v := getattr(memory, k)) is not None}
            if memory.reserved is not None:  # at most once a second (the probe's cadence): gpu_memory_increase
                observed["cuda_memory_reserved_bytes"] = memory.reserved
                if memory.total:
                    observed["cuda_memory_total_bytes"] = memory.total
        return observed

    def _apply_values(self, values: dict[str, float], t: float, same_step: bool) -> dict[str, float]:
        """Logged scalars; ``same_step``: logged right after the newest step (so samples/s is its rate)."""
        observed = dict(values)
        for name, value in values.items():
            if name == "loss":
                self._observe("loss", value, t)
                self.loss = value
                continue
            if name == "batch_size":  # exported as samples, not as one more gradwatch_metric (docs/metrics.md)
                self.samples_total += value
                if same_step and self.step_duration and self.step_duration > 0:
                    self.samples_per_second = observed["samples_per_second"] = value / self.step_duration
                continue
            if not math.isfinite(value):
                self.nonfinite["metric"] += 1
            if name in self.metrics or len(self.metrics) < MAX_METRIC_NAMES:
                self.metrics[name] = value
            else:
                self.metric_names_dropped += 1
                if self.metric_names_dropped == 1:
                    log.warning("run %s rank %d logs more than %d metric names: the values of the others (%r first) "
                                "are not kept (counted in gradwatch_logged_values_dropped_total{reason=\"over_cap\"})",
                                self.run, self.rank, MAX_METRIC_NAMES, name)
        return observed

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
            self._end(_END_STATES.get((self.end_status, self.exit_code is not None), RunStatus.FINISHED), now)
        elif judges_pid(self.meta.host, self.meta.pid, self.meta.pid_namespace, local_host) and self._process_gone(now):
            self._end(RunStatus.CRASHED, now)
        else:
            last = self.last_record_time or self.meta.start_time or now
            self.status = RunStatus.STALLED if now - last > stall_after else RunStatus.RUNNING
        return self.status

    def _process_gone(self, now: float) -> bool:
        """Whether the rank's process is gone; looked at once every PROCESS_CHECK_SECONDS (a /proc read per
        rank and loop pass would keep a 5,000-rank agent busy doing nothing else)."""
        if now - self.process_checked_at < PROCESS_CHECK_SECONDS:
            return False
        self.process_checked_at = now
        return process_alive(self.meta.pid, self.meta.proc_start_ticks) is False

    def _end(self, status: RunStatus, now: float) -> None:
        self.status = status
        self.ended_at = now

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every field (a new field is saved without further ado), the detectors' state, the metadata."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SAVED}
        state["status"] = self.status.value
        state["meta"] = meta_to_json(self.meta)
        state["detectors"] = {k: d.state_dict() for k, d in self.detectors.items()}
        state["recent_max"] = {k: m.state_dict() for k, m in self.recent_max.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of state_dict(); fields a checkpoint of an older agent lacks keep their defaults."""
        for f in fields(self):
            if f.name not in _NOT_SAVED and f.name not in ("status", "meta") and f.name in state:
                setattr(self, f.name, state[f.name])
        self.status = RunStatus(state.get("status", RunStatus.RUNNING.value))
        for key, detector in self.detectors.items():
            detector.load_state_dict(state.get("detectors", {}).get(key, {}))
        for key, recent in self.recent_max.items():
            recent.load_state_dict(state.get("recent_max", {}).get(key, []))


#: (end record status, exited with a status) -> the rank's state: a non-zero exit is a failure, an exception a crash
_END_STATES = {("failed", False): RunStatus.CRASHED, ("failed", True): RunStatus.FAILED,
               ("interrupted", False): RunStatus.INTERRUPTED, ("interrupted", True): RunStatus.INTERRUPTED}

_NOT_SAVED = frozenset({"run", "rank", "spike_window", "process_checked_at"})  # the checkpoint's keys and the agent's configuration


def run_status(ranks: list[RankState]) -> RunStatus:
    """The worst state of its ranks: crashed, failed, stalled, running, interrupted, finished (all finished)."""
    statuses = {r.status for r in ranks}
    for status in (RunStatus.CRASHED, RunStatus.FAILED, RunStatus.STALLED, RunStatus.RUNNING, RunStatus.INTERRUPTED):
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
    checkpoint_seconds: float | None = None  # the last periodic checkpoint: time to save, and its size
    checkpoint_bytes: int | None = None

    def reject(self, reason: str, n: int = 1) -> None:
        self.records_rejected[reason] = self.records_rejected.get(reason, 0) + n


@dataclass
class Tombstone:
    """A run whose series were dropped after it ended: the size of its records files then (None: not measured
    yet) and the stamps (inode and mtime) of its metadata files. Records that grow again (it resumed) or files replaced
    (a new run under the name) are read afresh."""

    size: int | None = None
    meta_stamps: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> list[Any]:
        return [self.size, {str(rank): inode for rank, inode in sorted(self.meta_stamps.items())}]

    @classmethod
    def from_json(cls, value: Any) -> Tombstone:
        if isinstance(value, int) and not isinstance(value, bool):  # before 2026-12: the size alone
            return cls(value)
        if isinstance(value, list) and len(value) == 2 and isinstance(value[1], dict):
            size = value[0] if isinstance(value[0], int) and not isinstance(value[0], bool) else None
            return cls(size, {int(r): i for r, i in value[1].items() if str(r).isdigit() and isinstance(i, int)})
        return cls()


class AgentState:
    """All runs, behind one lock shared by the ingest loop and the scrape."""

    def __init__(self, spike_window: float, rules: AgentRules | None = None) -> None:
        self.lock = threading.RLock()
        self.rules = rules if rules is not None else AgentRules(default_rules(), None)
        self.spike_window = spike_window
        self.runs: dict[str, dict[int, RankState]] = {}
        self.retired: dict[str, Tombstone] = {}  # runs whose series were dropped after they ended
        self.rejected_runs: dict[str, str] = {}  # run -> why its metadata was refused
        self.counters = AgentCounters()
        self.faults = RunFaults(time.monotonic)  # per-run failures of the agent's own steps (agent/faults.py)

    def rank(self, run: str, rank: int) -> RankState | None:
        return self.runs.get(run, {}).get(rank)

    def add_rank(self, run: str, rank: int, meta: RunMeta) -> RankState:
        state = RankState(run=run, rank=rank, meta=meta, spike_window=self.spike_window)
        self.runs.setdefault(run, {})[rank] = state
        self.rejected_runs.pop(run, None)
        return state

    def refresh(self, now: float, stall_after: float, ended_ttl: float, local_host: str) -> list[str]:
        """Decide every rank's state; retire runs ended for longer than ``ended_ttl``. Returns retired runs."""
        retired = []
        faults = self.faults
        for run, ranks in list(self.runs.items()):
            try:  # (not faults.guard: this runs for every run, several times a second)
                for state in ranks.values():
                    state.refresh_status(now, stall_after, local_host)
                if all(s.status.ended for s in ranks.values()):
                    ended_at = max(s.ended_at or now for s in ranks.values())
                    if now - ended_at > ended_ttl:
                        meta_stamps = {rank: s.meta_stamp for rank, s in ranks.items()}
                        self.drop_run(run)
                        self.retired[run] = Tombstone(None, meta_stamps)
                        retired.append(run)
            except Exception as exc:  # one run's failure must not cost the others: kept, reported, retried
                faults.failed(run, Stage.REFRESH, f"{type(exc).__name__}: {exc}")
            else:
                faults.recovered(run, Stage.REFRESH)
        return retired

    def tick_rules(self, now: float, gpu_utilization: dict[str, tuple[float, ...]] | None = None,
                   gpu_reading_t: float | None = None) -> list[Decision]:
        """The agent's clock to the rules of the runs that have rules firing on what does not arrive (a stall, a
        first step that never comes) or on the GPU readings (each run's GPUs' utilisation, taken at
        ``gpu_reading_t``): their decisions, for the dispatcher. Rules read rank 0."""
        out: list[Decision] = []
        for run, ranks in self.runs.items():
            rank0, rules = ranks.get(0), self.rules.runs.get(run)
            if rank0 is None or rules is None or not rules.watches_time:
                continue
            try:
                out += rules.tick(TickObservation(now=now, step=rank0.steps_total, last_step_t=rank0.last_step_time,
                                                  start_time=rank0.meta.start_time,
                                                  ended=rank0.status.ended or rank0.history,
                                                  gpu_utilization=(gpu_utilization or {}).get(run, ()),
                                                  gpu_reading_t=gpu_reading_t))
            except Exception as exc:  # one run's failure must not cost the others
                self.faults.failed(run, Stage.RULES, f"{type(exc).__name__}: {exc}")
        return out

    def drop_run(self, run: str) -> None:
        """Forget everything about ``run`` (its series end; its tombstone, if any, too)."""
        self.runs.pop(run, None)
        self.rules.forget(run)
        self.retired.pop(run, None)
        self.faults.forget(run)

    def forget_missing(self, present: set[str]) -> None:
        """Runs whose directory was deleted: drop them and their tombstones."""
        for run in list(self.runs):
            if run not in present:
                self.drop_run(run)
        self.retired = {run: tomb for run, tomb in self.retired.items() if run in present}
        for run in list(self.rejected_runs):
            if run not in present:
                del self.rejected_runs[run]

    def state_dict(self) -> dict[str, Any]:
        return {
            "runs": {run: {str(r): s.state_dict() for r, s in ranks.items()}
                     for run, ranks in self.runs.items()},
            "retired": {run: tomb.to_json() for run, tomb in sorted(self.retired.items())},
            "rules": self.rules.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.runs.clear()
        for run, ranks in state.get("runs", {}).items():
            try:
                for rank, rank_state in ranks.items():
                    self.add_rank(run, int(rank), decode_meta(rank_state["meta"])).load_state_dict(rank_state)
            except Exception as exc:  # one run's bad entry costs only that run: it is read again from its start
                self.runs.pop(run, None)
                log.warning("agent checkpoint: the state of run %s is unusable (%s: %s); reading its records again",
                            run, type(exc).__name__, exc)
        retired = state.get("retired", {})
        self.retired = {str(run): Tombstone() for run in retired} if isinstance(retired, list) else \
            {str(run): Tombstone.from_json(value) for run, value in retired.items()}
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
            try:
                out.append(self._run_summary(run, ranks, now))
            except Exception as exc:  # this run is left out of the list, the others are served
                self.faults.failed(run, Stage.COLLECT, f"{type(exc).__name__}: {exc}", backoff=False)
        listed = {entry["run"] for entry in out}
        for run in sorted({run for run, _ in self.faults.open} - listed - set(self.rejected_runs)):
            out.append({"run": run, "status": "faulty", "faults": self.faults.of_run(run), "ranks": []})
        for run, reason in sorted(self.rejected_runs.items()):
            out.append({"run": run, "status": "rejected", "error": reason, "ranks": []})
        return out

    def _run_summary(self, run: str, ranks: dict[int, RankState], now: float) -> dict[str, Any]:
        states = [ranks[r] for r in sorted(ranks)]
        first = states[0]
        rules = self.rules.runs.get(run)
        return {
            "run": run,
            "status": run_status(states).value,
            "world_size": first.meta.world_size,
            "host": first.meta.host,
            "start_time": first.meta.start_time,
            "labels": first.meta.labels,
            "rules": None if rules is None else {
                "source": rules.source, "dry_run": rules.config.dry_run,
                "acting": [r.name for r in rules.config.rules if rules.config.acting(r)],
                "recent_decisions": list(rules.recent),
                "error": self.rules.run_rule_errors.get(run),
                "unseen_metrics": dict(rules.unseen_metrics),
                "failed": rules.failed_rules,
            },
            "ranks": [{
                "rank": s.rank, **({"worker": s.meta.worker} if s.meta.worker else {}), "status": s.status.value,
                "pid": s.meta.pid, "steps": s.steps_total,
                "loss": s.loss, "grad_norm": s.grad_norm, "learning_rates": s.learning_rates,
                "step_duration_seconds": s.step_duration, "data_wait_seconds": s.data_wait,
                "samples_per_second": s.samples_per_second, "last_step_time": s.last_step_time,
                "seconds_since_last_record": None if s.last_record_time is None else now - s.last_record_time,
                "nonfinite": s.nonfinite, "spikes": s.spikes, "metrics": s.metrics,
                "probe_dropped": s.probe_dropped, "error": s.end_error, "end_status": s.end_status,
                "actions": s.actions, "recent_actions": s.recent_actions, "clip_threshold": s.clip_threshold,
                "clipped_fraction": s.clipped_fraction, "commands_late": s.commands_late,
                "steps_from": s.meta.steps_from, "exit_code": s.exit_code, "resumes": s.resumes,
                "history": s.history, "nonfinite_origins": s.nonfinite_origins,
                "spike_samples": s.spike_samples,
            } for s in states],
            "faults": self.faults.of_run(run),
        }



TOP_LAYER_SERIES = 10  # layer series per rank and metric (bounded cardinality)


def stable_top(current: list[str], values: dict[str, float], k: int = TOP_LAYER_SERIES) -> list[str]:
    """The ``k`` layers to export, with hysteresis: a layer in the set stays while it is among the ``2k`` largest
    values and no outsider is twice its value; free places go to the largest others. Plain top-k changes
    membership between scrapes whenever two layers trade places, and graph lines get gaps; this set changes only
    when a layer really moves (one that explodes gets in at once)."""
    ranked = [name for name, v in sorted(values.items(), key=lambda item: item[1], reverse=True) if math.isfinite(v)]
    keep_within = set(ranked[:2 * k])
    kept = [name for name in current if name in keep_within][:k]
    for name in ranked:
        if name in kept:
            continue
        if len(kept) < k:
            kept.append(name)
            continue
        smallest = min(kept, key=lambda n: values[n])
        if values[name] <= 2 * values[smallest]:
            break  # ranked: no later outsider is larger
        kept[kept.index(smallest)] = name
    return kept
