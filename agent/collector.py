"""Turn the agent state into metric families at scrape time (a custom prometheus_client Collector)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from gradwatch import __version__
from gradwatch.agent import catalogue as c
from gradwatch.agent.alerts import Alert
from gradwatch.agent.exposition import SeriesWriter, render
from gradwatch.agent.exposition import escape_label_value as esc
from gradwatch.agent.faults import Stage
from gradwatch.agent.gpus import GpuCollector, GpuSample, normal_uuid
from gradwatch.agent.notify import DeliveryStats
from gradwatch.agent.state import NONFINITE_QUANTITIES, SPIKE_METRICS, AgentState, RankState, RunStatus
from gradwatch.spool.proc import judges_pid

RUNS_PER_LOCK = 50  # runs whose samples a scrape makes per hold of the state lock (a few ms)


_RUN_SPECS = tuple(spec for spec in c.ALL if spec.labels[:2] == c.RUN_LABELS)
_WRITERS = {spec.name: SeriesWriter(spec) for spec in _RUN_SPECS}


@dataclass
class GpuOwners:
    """The live ranks using GPUs: by normalised UUID (agent/gpus.py), and by pid for probes that listed none."""

    by_uuid: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    by_pid: dict[int, set[tuple[str, str]]] = field(default_factory=dict)


def gpu_owners(state: AgentState, local_host: str) -> GpuOwners:
    """Who uses which GPU, from the live ranks' metadata: by UUID (any host, any pid namespace: a UUID names
    one device), else by pid where this agent can judge the pid (this host, this pid namespace)."""
    owners = GpuOwners()
    for run, ranks in state.runs.items():
        for rank, s in ranks.items():
            if s.status.ended:
                continue
            meta = s.meta
            for uuid in meta.gpu_uuids:
                owners.by_uuid.setdefault(normal_uuid(uuid), set()).add((run, str(rank)))
            if not meta.gpu_uuids and judges_pid(meta.host, meta.pid, meta.pid_namespace, local_host):
                owners.by_pid.setdefault(meta.pid, set()).add((run, str(rank)))
    return owners


def gpu_users(gpu: GpuSample, owners: GpuOwners) -> set[tuple[str, str]]:
    """The (run, rank)s on one GPU."""
    users = set(owners.by_uuid.get(normal_uuid(gpu.uuid), ()))
    for pid in gpu.pids:
        users |= owners.by_pid.get(pid, set())
    return users


def utilization_by_run(state: AgentState, gpus: list[GpuSample], local_host: str) -> dict[str, tuple[float, ...]]:
    """Each run's GPUs' utilisation (0..1) at this reading, in the order of the GPUs: what low_gpu_utilization
    reads. A MIG instance has none (NVML reports none); a GPU two runs share counts for both."""
    owners = gpu_owners(state, local_host)
    out: dict[str, list[float]] = {}
    for gpu in gpus:
        if gpu.utilization is None:
            continue
        for run in sorted({run for run, _ in gpu_users(gpu, owners)}):
            out.setdefault(run, []).append(gpu.utilization)
    return {run: tuple(values) for run, values in out.items()}


class AgentCollector(Collector):
    """The agent's metrics. ``exposition()`` is what /metrics serves: the per-run series, written directly
    (agent/exposition.py), then the agent's own families and the GPUs' through prometheus_client
    (``collect()``)."""

    def __init__(self, state: AgentState, clock: Callable[[], float] = time.time,
                 watcher_alive: Callable[[], bool] = lambda: True,
                 alerting: Callable[[], tuple[list[Alert], dict[str, DeliveryStats]]] = lambda: ([], {}),
                 gpus: GpuCollector | None = None, local_host: str = "") -> None:
        self.state = state
        self.gpus = gpus
        self.local_host = local_host
        self.clock = clock
        self.watcher_alive = watcher_alive
        self.alerting = alerting  # (the agent's firing alerts, delivery statistics by endpoint)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        self._runs_seconds = 0.0

    def exposition(self) -> bytes:
        """The whole scrape, in Prometheus' text format 0.0.4."""
        started = time.perf_counter()
        runs = self.run_series()
        self._runs_seconds = time.perf_counter() - started
        return runs.encode() + generate_latest(self._registry)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        with self.state.lock:
            families = self._agent_families()
            owners = gpu_owners(self.state, self.local_host) if self.gpus is not None and self.gpus.count else GpuOwners()
        yield from families
        yield from self._gpu_families(owners)
        duration = c.AGENT_SCRAPE_DURATION.family()
        duration.add_metric([], time.perf_counter() - started + self._runs_seconds)
        yield duration

    def run_series(self) -> str:
        """The per-run families. Their samples are made RUNS_PER_LOCK runs at a time under the state lock, so that
        a scrape of thousands of runs holds ingestion up for a moment at a time, never for the whole scrape (and
        waits for the lock a few dozen times, not once per run)."""
        lines: dict[str, list[str]] = {spec.name: [] for spec in _RUN_SPECS}
        with self.state.lock:
            runs = sorted(self.state.runs.items())
        for first in range(0, len(runs), RUNS_PER_LOCK):
            with self.state.lock:
                for run, ranks in runs[first:first + RUNS_PER_LOCK]:
                    self._add_run(run, ranks, lines)
        return render((spec, lines[spec.name]) for spec in _RUN_SPECS)

    def _add_run(self, run: str, ranks: dict[int, RankState], lines: dict[str, list[str]]) -> None:
        # a run's lines are added once all of them were made: a run that fails half-way adds none
        staged: list[tuple[str, str]] = []
        try:
            self._run_samples(run, ranks, staged)
            infos = [_info_labels(s) for _, s in sorted(ranks.items())]
        except Exception as exc:  # this run's series are left out of the scrape; the other runs are served
            self.state.faults.failed(run, Stage.COLLECT, f"{type(exc).__name__}: {exc}", backoff=False)
            return
        self.state.faults.recovered(run, Stage.COLLECT)
        for name, line in staged:
            lines[name].append(line)
        info = _WRITERS[c.RUN_INFO.name]
        lines[c.RUN_INFO.name] += [info.line_with(labels, 1.0) for labels in infos]

    def _run_samples(self, run: str, ranks: dict[int, RankState], staged: list[tuple[str, str]]) -> None:
        now = self.clock()

        def put(spec: c.MetricSpec, labels: list[str], value: float | None) -> None:
            if value is not None:
                staged.append((spec.name, _WRITERS[spec.name].line(labels, float(value))))

        for rank, s in sorted(ranks.items()):
            key = [esc(run), str(rank)]  # label values escaped once, here (SeriesWriter)
            first = key + ["0"]  # the optimizer label of the run's first optimizer (its steps are the run's)
            put(c.LOSS, first, s.loss)
            put(c.GRAD_NORM, first, s.grad_norm)
            for group, lr in enumerate(s.learning_rates):
                put(c.LEARNING_RATE, first + [str(group)], lr)
            put(c.STEPS, first, s.steps_total)
            for name, series in sorted(s.optimizers.items()):
                other = key + [esc(name)]
                put(c.LOSS, other, series.get("loss"))
                put(c.GRAD_NORM, other, series.get("grad_norm"))
                for group, lr in enumerate(series.get("lr") or []):
                    put(c.LEARNING_RATE, other + [str(group)], lr)
                put(c.STEPS, other, series.get("steps"))
            put(c.STEP_DURATION, key, s.step_duration)
            put(c.DATA_WAIT, key, s.data_wait)
            put(c.STEP_SECONDS, key, s.step_seconds_total)
            put(c.DATA_WAIT_SECONDS, key, s.data_wait_seconds_total)
            put(c.SAMPLES_PER_SECOND, key, s.samples_per_second)
            put(c.SAMPLES, key, s.samples_total)
            for quantity in NONFINITE_QUANTITIES:
                put(c.NONFINITE, key + [quantity], s.nonfinite.get(quantity, 0))
            for quantity in SPIKE_METRICS:
                put(c.SPIKES, key + [quantity], s.spikes.get(quantity, 0))
            put(c.LOSS_RECENT_MAX, key, s.recent_max["loss"].value(now))
            put(c.GRAD_NORM_RECENT_MAX, key, s.recent_max["grad_norm"].value(now))
            put(c.LAST_STEP_TIMESTAMP, key, s.last_step_time)
            put(c.RUN_START_TIMESTAMP, key, s.meta.start_time)
            for state in RunStatus:
                put(c.RUN_STATE, key + [state.value], 1.0 if s.status is state else 0.0)
            for name, value in sorted(s.metrics.items()):
                put(c.METRIC, key + [esc(name)], value)
            put(c.PROBE_DROPPED, key, s.probe_dropped)
            put(c.VALUES_DROPPED, key + ["unreadable"], s.values_unreadable)
            put(c.VALUES_DROPPED, key + ["over_cap"], s.metric_names_dropped)
            for action_reason, n in sorted(s.actions.items()):
                put(c.ACTIONS, key + [esc(part) for part in action_reason.split(":", 1)], n)
            put(c.COMMANDS_LATE, key, s.commands_late)
            put(c.CLIP_THRESHOLD, key, s.clip_threshold)
            if s.guarded_steps:
                put(c.CLIPPED_STEPS, key, s.clipped_steps)
                put(c.CLIPPED_FRACTION, key, s.clipped_fraction)
            if s.would_skip:
                put(c.RULE_DECISIONS, key + ["guards.skip", "skip_step", "observe"], s.would_skip)
            for name, value in _exported(s.exported_grad_layers, s.layer_grad_norms):
                put(c.LAYER_GRAD_NORM, key + [esc(name)], value)
            for name, value in _exported(s.exported_ratio_layers, s.layer_update_ratios):
                put(c.LAYER_UPDATE_RATIO, key + [esc(name)], value)
            memory = s.cuda_memory
            put(c.CUDA_MEMORY_ALLOCATED, key, memory.get("allocated"))
            put(c.CUDA_MEMORY_RESERVED, key, memory.get("reserved"))
            put(c.CUDA_MEMORY_PEAK, key, memory.get("peak"))
            put(c.CUDA_MEMORY_TOTAL, key, memory.get("total"))
        rules = self.state.rules.runs.get(run)
        if rules is not None:
            for (rule, action, mode), n in sorted(rules.decisions.items()):
                put(c.RULE_DECISIONS, [esc(run), "0", esc(rule), esc(action), esc(mode)], n)  # agent rules read rank 0
            for rule, rule_state in sorted(rules.states.items()):
                if rule_state.triggered:
                    put(c.RULE_FIRED, [esc(run), "0", esc(rule)], rule_state.triggered)

    def _gpu_families(self, owners: GpuOwners) -> list[c.Family]:
        """One series per GPU (and MIG instance) and gradwatch process on it (run="" rank="" for one none of ours
        uses)."""
        specs = (c.GPU_UTILIZATION, c.GPU_MEMORY_USED, c.GPU_MEMORY_TOTAL, c.GPU_POWER, c.GPU_TEMPERATURE,
                 c.GPU_SM_CLOCK)
        families = {spec.name: spec.family() for spec in specs + (c.GPU_THROTTLED,)}
        for gpu in self.gpus.sample() if self.gpus is not None else []:
            users = gpu_users(gpu, owners)
            values = (gpu.utilization, gpu.memory_used, gpu.memory_total, gpu.power_watts, gpu.temperature_celsius,
                      gpu.sm_clock_hertz)
            for run, rank in sorted(users) or [("", "")]:
                labels = [gpu.gpu, gpu.uuid, self.local_host, run, rank]
                for spec, value in zip(specs, values, strict=True):
                    if value is not None:
                        families[spec.name].add_metric(labels, value)
                for reason, on in sorted(gpu.throttled.items()):
                    families[c.GPU_THROTTLED.name].add_metric(labels + [reason], 1.0 if on else 0.0)
        count = c.AGENT_GPUS.family()
        count.add_metric([], self.gpus.count if self.gpus is not None else 0)
        age = c.AGENT_GPU_READING_AGE.family()
        if self.gpus is not None and (seconds := self.gpus.reading_age()) is not None:
            age.add_metric([], seconds)
        return list(families.values()) + [count, age]

    def _agent_families(self) -> list[c.Family]:
        counters = self.state.counters
        out = []

        def single(spec: c.MetricSpec, value: float | None, labels: list[str] | None = None) -> None:
            family = spec.family()
            if value is not None:
                family.add_metric(labels or [], value)
            out.append(family)

        single(c.AGENT_INGESTED, counters.records_ingested)
        rejected = c.AGENT_REJECTED.family()
        for reason in sorted(set(counters.records_rejected) | {"malformed", "invalid"}):
            rejected.add_metric([reason], counters.records_rejected.get(reason, 0))
        out.append(rejected)
        single(c.AGENT_INGEST_LAG, counters.ingest_lag_seconds)
        single(c.AGENT_CHECKPOINT_DURATION, counters.checkpoint_seconds)
        single(c.AGENT_CHECKPOINT_BYTES, counters.checkpoint_bytes)
        single(c.AGENT_RESCANS, counters.rescans)
        single(c.AGENT_HANDLER_ERRORS, counters.handler_errors)
        single(c.AGENT_WATCHER_UP, 1.0 if self.watcher_alive() else 0.0)
        single(c.AGENT_WATCHER_RESTARTS, counters.watcher_restarts)
        runs = c.AGENT_RUNS.family()
        for state, n in self.state.runs_by_status().items():
            runs.add_metric([state.value], n)
        out.append(runs)
        single(c.AGENT_RUNS_REJECTED, len(self.state.rejected_runs))
        faults, faulty = c.AGENT_RUN_FAULTS.family(), c.AGENT_RUNS_FAULTY.family()
        open_faults = self.state.faults.faulty_by_stage()
        for stage, n in self.state.faults.totals.items():
            faults.add_metric([stage.value], n)
            faulty.add_metric([stage.value], open_faults[stage])
        out += [faults, faulty]
        reloads = c.AGENT_RULES_RELOADS.family()
        for result, n in sorted(self.state.rules.reloads.items()):
            reloads.add_metric([result], n)
        out.append(reloads)
        out += self._alert_families()
        single(c.AGENT_BUILD_INFO, 1.0, [__version__])
        return out

    def _alert_families(self) -> list[c.Family]:
        firing, stats = self.alerting()
        by_severity = c.AGENT_ALERTS_FIRING.family()
        for severity in ("critical", "warning", "info"):
            by_severity.add_metric([severity], sum(a.labels.get("severity") == severity for a in firing))
        results, failures, pending = (c.AGENT_NOTIFICATIONS.family(), c.AGENT_NOTIFICATION_FAILURES.family(),
                                      c.AGENT_NOTIFICATIONS_PENDING.family())
        for endpoint, st in sorted(stats.items()):
            for result in ("delivered", "expired", "dropped"):
                results.add_metric([endpoint, result], getattr(st, result))
            failures.add_metric([endpoint], st.failed_attempts)
            pending.add_metric([endpoint], st.pending)
        return [by_severity, results, failures, pending]


def _info_labels(s: RankState) -> dict[str, str]:
    """gradwatch_run_info's labels: the run's metadata, and the user's labels as label_<key>."""
    meta = s.meta
    labels = dict(zip(c.RUN_INFO.labels, [
        s.run, str(s.rank), meta.host, str(meta.pid), str(meta.local_rank), str(meta.world_size), meta.torch,
        meta.gradwatch, meta.worker,
    ], strict=True))
    for key, value in sorted(meta.labels.items())[:16]:
        labels["label_" + "".join(ch if ch.isalnum() else "_" for ch in str(key))] = str(value)
    return labels


def _exported(names: list[str], values: dict[str, float]) -> list[tuple[str, float]]:
    """The layers the state chose to export (a stable set, agent/state.py stable_top), with their values."""
    return [(name, v) for name in names if (v := values.get(name)) is not None and math.isfinite(v)]
