"""Turn the agent state into metric families at scrape time (a custom prometheus_client Collector)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from gradwatch import __version__
from gradwatch.agent import catalogue as c
from gradwatch.agent.alerts import Alert
from gradwatch.agent.notify import DeliveryStats
from gradwatch.agent.state import NONFINITE_QUANTITIES, SPIKE_METRICS, AgentState, RankState, RunStatus


class AgentCollector(Collector):
    def __init__(self, state: AgentState, clock: Callable[[], float] = time.time,
                 watcher_alive: Callable[[], bool] = lambda: True,
                 alerting: Callable[[], tuple[list[Alert], dict[str, DeliveryStats]]] = lambda: ([], {})) -> None:
        self.state = state
        self.clock = clock
        self.watcher_alive = watcher_alive
        self.alerting = alerting  # (the agent's firing alerts, delivery statistics by endpoint)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        with self.state.lock:
            families = self._run_families() + self._agent_families()
        yield from families
        duration = c.AGENT_SCRAPE_DURATION.family()
        duration.add_metric([], time.perf_counter() - started)
        yield duration

    def _run_families(self) -> list[Metric]:
        now = self.clock()
        f = {spec.name: spec.family() for spec in c.ALL if spec.labels[:2] == c.RUN_LABELS}

        def put(spec: c.MetricSpec, labels: list[str], value: float | None) -> None:
            if value is not None:
                f[spec.name].add_metric(labels, value)

        for run, ranks in sorted(self.state.runs.items()):
            for rank, s in sorted(ranks.items()):
                key = [run, str(rank)]
                put(c.LOSS, key, s.loss)
                put(c.GRAD_NORM, key, s.grad_norm)
                for group, lr in enumerate(s.learning_rates):
                    put(c.LEARNING_RATE, key + [str(group)], lr)
                put(c.STEPS, key, s.steps_total)
                put(c.STEP_DURATION, key, s.step_duration)
                put(c.DATA_WAIT, key, s.data_wait)
                put(c.SAMPLES_PER_SECOND, key, s.samples_per_second)
                put(c.SAMPLES, key, s.samples_total)
                for quantity in NONFINITE_QUANTITIES:
                    put(c.NONFINITE, key + [quantity], s.nonfinite.get(quantity, 0))
                for quantity in SPIKE_METRICS:
                    put(c.SPIKES, key + [quantity], s.spikes.get(quantity, 0))
                put(c.LOSS_RECENT_MAX, key, s.recent_max["loss"].value(now))
                put(c.GRAD_NORM_RECENT_MAX, key, s.recent_max["grad_norm"].value(now))
                put(c.LAST_STEP_TIMESTAMP, key, s.last_step_time)
                put(c.RUN_START_TIMESTAMP, key, s.meta.get("start_time"))
                for state in RunStatus:
                    put(c.RUN_STATE, key + [state.value], 1.0 if s.status is state else 0.0)
                for name, value in sorted(s.metrics.items()):
                    put(c.METRIC, key + [name], value)
                put(c.PROBE_DROPPED, key, s.probe_dropped)
                for action_reason, n in sorted(s.actions.items()):
                    put(c.ACTIONS, key + action_reason.split(":", 1), n)
                put(c.COMMANDS_LATE, key, s.commands_late)
                put(c.CLIP_THRESHOLD, key, s.clip_threshold)
                if s.guarded_steps:
                    put(c.CLIPPED_STEPS, key, s.clipped_steps)
                    put(c.CLIPPED_FRACTION, key, s.clipped_fraction)
                if s.would_skip:
                    put(c.RULE_DECISIONS, key + ["guards.skip", "skip_step", "observe"], s.would_skip)
                self._add_info(f[c.RUN_INFO.name], s)
            rules = self.state.rules.runs.get(run)
            if rules is not None:
                for (rule, action, mode), n in sorted(rules.decisions.items()):
                    put(c.RULE_DECISIONS, [run, "0", rule, action, mode], n)  # agent rules read rank 0
        return list(f.values())

    @staticmethod
    def _add_info(family: Metric, s: RankState) -> None:
        meta = s.meta
        labels = dict(zip(c.RUN_INFO.labels, [
            s.run, str(s.rank), str(meta.get("host", "")), str(meta.get("pid", "")), str(meta.get("local_rank", "")),
            str(meta.get("world_size", "")), str(meta.get("torch", "")), str(meta.get("gradwatch", "")),
        ], strict=True))
        for key, value in sorted((meta.get("labels") or {}).items())[:16]:
            labels["label_" + "".join(ch if ch.isalnum() else "_" for ch in str(key))] = str(value)
        family.add_sample(c.RUN_INFO.name, labels, 1.0)

    def _agent_families(self) -> list[Metric]:
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
        single(c.AGENT_RESCANS, counters.rescans)
        single(c.AGENT_HANDLER_ERRORS, counters.handler_errors)
        single(c.AGENT_WATCHER_UP, 1.0 if self.watcher_alive() else 0.0)
        single(c.AGENT_WATCHER_RESTARTS, counters.watcher_restarts)
        runs = c.AGENT_RUNS.family()
        for state, n in self.state.runs_by_status().items():
            runs.add_metric([state.value], n)
        out.append(runs)
        single(c.AGENT_RUNS_REJECTED, len(self.state.rejected_runs))
        reloads = c.AGENT_RULES_RELOADS.family()
        for result, n in sorted(self.state.rules.reloads.items()):
            reloads.add_metric([result], n)
        out.append(reloads)
        out += self._alert_families()
        single(c.AGENT_BUILD_INFO, 1.0, [__version__])
        return out

    def _alert_families(self) -> list[Metric]:
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
