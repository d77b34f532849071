"""Deciding which alerts fire: from the rules' detectors (every step) and the runs' states.

No I/O here: ``AlertTracker.evaluate`` compares what holds now with what fired before and
returns the changes (new alerts, resolved alerts); agent/notify.py delivers them.

- A rule alert fires when the rule's detector triggers (also while cooldown or ``max_actions``
  keep the rule from acting) and resolves once the detector has stayed quiet (and its condition,
  e.g. a NaN streak or a threshold crossing, has stopped holding) for
  ``resolve_after`` seconds, also after the run finished: a NaN in the last steps of a short run
  must still reach a person (Alertmanager does not notify an alert that resolves before its
  group_wait). Rules read rank 0, so these carry rank "0".
- ``GradwatchRunStalled`` fires while a rank is stalled; ``GradwatchRunCrashed`` (critical) while a rank is
  crashed, ``GradwatchRunFailed`` (warning) while its script's non-zero exit status stands, until the run is
  retired (``ended_ttl_seconds``) or resumed. An interrupted run (Ctrl-C, SIGTERM) pages nobody.
- Nothing fires on records the agent read as history: those of a run that had ended before this agent
  started (agent/ingest.py), so a freshly started agent does not page for yesterday's runs.

The set of firing alerts is saved with the checkpoint, so a restarted agent still resolves
what the previous one fired.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gradwatch.agent.faults import Stage
from gradwatch.agent.links import AlertLinks, alert_name
from gradwatch.agent.state import AgentState, RankState, RunStatus
from gradwatch.rules.engine import RuleState
from gradwatch.spool.records import SPIKE_SAMPLE_GAP

SOURCE = "agent"  # label that tells the agent's alerts from those of the Prometheus rules (source="prometheus")

# What to check, by detector type: one line a person can act on.
_HINTS = {
    "nonfinite": "Look at the batch and the learning rate at that step; updates with non-finite gradients are "
                 "skipped by the default guard, the loss tells whether the weights are already damaged.",
    "spike": "A bad batch or a learning rate too high for this phase; see `gradwatch status` for what the rules did.",
    "divergence": "Lower the learning rate (or warm up longer) and resume from a checkpoint before the rise.",
    "plateau": "Reduce the learning rate, or stop the run if it has converged.",
    "early_stopping": "The run has stopped improving; stop it or let a rule with mode: act stop it.",
    "threshold": "Check why the metric left the range the rule expects.",
    # the catalogue's (SageMaker Debugger's names): the summary says what to try; the runbook explains the rule
    "vanishing_gradient": "See the summary for the layer and what to try; docs/rules.md explains the rule.",
    "exploding_tensor": "Look at the batch and the learning rate at that step; the origin annotation names the layer.",
    "weight_update_ratio": "See the summary for the layer and what to try; docs/rules.md explains the rule.",
    "all_zero": "See the summary for the layer and what to try; docs/rules.md explains the rule.",
    "input_bound": "Feed the GPU faster: DataLoader workers, pin_memory, prefetching.",
    "step_outlier": "See the summary for the slow steps' figures; the Run dashboard's step-time panel shows them.",
    "low_gpu_utilization": "See the summary for the GPU and what to try; docs/rules.md explains the rule.",
}


@dataclass(frozen=True)
class Alert:
    """One alert as Alertmanager sees it: labels identify it, annotations describe it."""

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: float | None = None  # set when resolved

    @property
    def key(self) -> str:
        return alert_key(self.labels)

    @property
    def firing(self) -> bool:
        return self.ends_at is None

    @property
    def name(self) -> str:
        return self.labels["alertname"]


def alert_key(labels: dict[str, str]) -> str:
    """What identifies an alert of the agent (the other labels follow from these)."""
    return "|".join(labels[k] for k in ("alertname", "run", "rank"))


CHECK_AFTER_STEPS = 20  # the forward check runs a few steps after the non-finite one (the writer reads it first)


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _outcome(outcome: dict[str, Any] | None) -> dict[str, str]:
    """The annotation that says what became of the rule's last command, when it did not change the run."""
    if not outcome or outcome.get("status") not in ("not_taken", "rejected"):
        return {}
    verb = "did not take" if outcome["status"] == "not_taken" else "was refused"
    return {"action_outcome": f"its {outcome.get('action')} after step {outcome.get('step')} {verb}: "
                              f"{str(outcome.get('detail', ''))[:300]}"}


def _spike_layers(trigger: dict[str, Any], rank0: RankState) -> dict[str, str]:
    """The probe's on-trigger layer sample of a spike trigger's stretch (at its step, or the stretch's first step a
    few before: one sample per SPIKE_SAMPLE_GAP steps): ``layers``, as the alert's annotation."""
    if trigger.get("reason") != "spike" or not rank0.spike_samples:
        return {}
    step = int(trigger.get("step", 0))
    near = [s["text"] for s in rank0.spike_samples if step - SPIKE_SAMPLE_GAP < s["step"] <= step]
    return {"layers": near[-1]} if near else {}


def _origin(trigger: dict[str, Any], rank0: RankState) -> dict[str, str]:
    """Where a non-finite value came from (the probe's nonfinite records from that step on), for a non-finite
    trigger: ``origin``, as the alert's annotation."""
    if trigger.get("reason") != "nonfinite" or not rank0.nonfinite_origins:
        return {}
    step = int(trigger.get("step", 0))
    near = [o["text"] for o in rank0.nonfinite_origins if step - 1 <= o["step"] <= step + CHECK_AFTER_STEPS]
    return {"origin": "; ".join(near[:3])} if near else {}


def _rule_text(run: str, metric: str, reason: str, step: int, details: dict[str, Any]) -> str:
    evidence = details.get("evidence")
    if isinstance(evidence, str) and evidence:  # a catalogue rule says it in words (rules/catalogue.py)
        return f"Run {run}: {evidence[:500]}"
    value = _num(details.get("value"))
    if reason == "nonfinite":
        what = f"{metric} is {value} at step {step}"
    elif reason == "spike":
        z = details.get("z")
        sigma = f", {z:.1f} standard deviations above its average {_num(details.get('mean'))}" \
            if isinstance(z, (int, float)) else ""
        what = f"{metric} spiked to {value} at step {step}{sigma}"
    elif reason == "divergence":
        what = (f"{metric} is diverging at step {step}: smoothed {_num(details.get('smoothed'))}, "
                f"best {_num(details.get('best'))}")
    elif reason == "plateau":
        what = (f"{metric} has not improved for {details.get('bad_checks')} checks "
                f"(best {_num(details.get('best'))}, now {value}, step {step})")
    elif reason == "threshold":
        what = f"{metric} = {value} at step {step} is outside its range"
    else:
        what = f"{metric} met the early-stopping criterion '{reason}' at step {step} (now {value})"
    return f"Run {run}: {what}"


_SEVERITY_ORDER = ("info", "warning", "critical")


def _severity(rule_alert: str, trigger_severity: object) -> str:
    """The rule's alert severity, or a lower one its trigger asks for (a periodic slow step is news, not a fault)."""
    if isinstance(trigger_severity, str) and trigger_severity in _SEVERITY_ORDER and rule_alert in _SEVERITY_ORDER \
            and _SEVERITY_ORDER.index(trigger_severity) < _SEVERITY_ORDER.index(rule_alert):
        return trigger_severity
    return rule_alert


@dataclass
class _Condition:
    labels: dict[str, str]
    annotations: dict[str, str]
    since: float  # when the condition was first seen (for startsAt)


@dataclass
class AlertTracker:
    resolve_after: float
    links: AlertLinks = field(default_factory=AlertLinks)
    active: dict[str, Alert] = field(default_factory=dict)

    def evaluate(self, state: AgentState, now: float) -> list[Alert]:
        """What changed since the last call: alerts that started firing, and alerts that resolved.
        A firing alert whose text changed (a later trigger) is updated in place, not reported again."""
        with state.lock:  # the scrape reads ``active`` under the same lock
            conditions = self._conditions(state, now)
            changes = []
            for key, cond in conditions.items():
                old = self.active.get(key)
                if old is None:
                    alert = Alert(cond.labels, cond.annotations, starts_at=min(cond.since, now))
                    self.active[key] = alert
                    changes.append(alert)
                elif old.annotations != cond.annotations:
                    self.active[key] = replace(old, annotations=cond.annotations)
            for key in list(self.active):
                if key not in conditions:
                    changes.append(replace(self.active.pop(key), ends_at=now))
        return changes

    def firing(self) -> list[Alert]:
        return list(self.active.values())

    # -- what holds now ----------------------------------------------------------------------------
    def _conditions(self, state: AgentState, now: float) -> dict[str, _Condition]:
        out: dict[str, _Condition] = {}
        for run, ranks in state.runs.items():
            found: dict[str, _Condition] = {}
            try:
                self._run_conditions(found, state, run, ranks, now)
            except Exception as exc:  # this run's alerts stay as they are (no false resolve); the others go on
                state.faults.failed(run, Stage.ALERTS, f"{type(exc).__name__}: {exc}")
                found = {key: _Condition(a.labels, a.annotations, a.starts_at) for key, a in self.active.items()
                         if a.labels.get("run") == run}
            else:
                state.faults.recovered(run, Stage.ALERTS)
            out.update(found)
        return out

    def _run_conditions(self, out: dict[str, _Condition], state: AgentState, run: str, ranks: dict[int, RankState],
                        now: float) -> None:
        for rank_state in ranks.values():
            self._state_alerts(out, rank_state, now)
        rank0 = ranks.get(0)
        if rank0 is None:
            return
        # for_run, not runs.get: after a restart a run's rules (and their triggers) come from the checkpoint
        for rule_state in state.rules.for_run(run, rank0.meta).states.values():
            self._rule_alert(out, rule_state, rank0, now)

    def _put(self, out: dict[str, _Condition], cond: _Condition) -> None:
        cond.annotations.update(self.links.annotations(cond.labels))  # its runbook and its run's dashboard
        out[alert_key(cond.labels)] = cond

    def _labels(self, name: str, rank_state: RankState, severity: str) -> dict[str, str]:
        return {"alertname": name, "run": rank_state.run, "rank": str(rank_state.rank), "severity": severity,
                "source": SOURCE}

    def _rule_alert(self, out: dict[str, _Condition], rule_state: RuleState, rank0: RankState, now: float) -> None:
        rule, trigger = rule_state.rule, rule_state.last_trigger
        if rule.alert == "none" or trigger is None or trigger.get("history") or \
                now - float(trigger.get("seen_t", trigger["t"])) > self.resolve_after:
            return
        name = alert_name(rule.name)
        text = _rule_text(rank0.run, rule.metric, trigger["reason"], trigger["step"], trigger.get("details", {}))
        outcome = _outcome(rule_state.last_outcome)
        self._put(out, _Condition(
            self._labels(name, rank0, _severity(rule.alert, trigger.get("details", {}).get("severity"))),
            {"summary": text,
             "description": (f"Rule {rule.name} ({rule.detect.type} on {rule.metric}, action {rule.action.type}, "
                             f"mode {rule.mode}) fired on run {rank0.run} rank 0 on host "
                             f"{rank0.meta.host or '?'}, last at step {trigger['step']}."
                             + (f" Note: {outcome['action_outcome']}." if outcome else "")),
             "hint": _HINTS.get(rule.detect.type, "See docs/alerts.md."),
             "step": str(trigger["step"]), **_outcome(rule_state.last_outcome), **_origin(trigger, rank0),
             **_spike_layers(trigger, rank0)},
            since=float(trigger["t"])))

    def _state_alerts(self, out: dict[str, _Condition], s: RankState, now: float) -> None:
        if s.history:
            return  # it ended before this agent started: its state is shown, not paged
        where = f"run {s.run} rank {s.rank} (pid {s.meta.pid or '?'} on host {s.meta.host or '?'})"
        if s.status == RunStatus.FAILED:
            self._put(out, _Condition(
                self._labels("GradwatchRunFailed", s, "warning"),
                {"summary": f"Run {s.run} rank {s.rank} exited with status {s.exit_code} at step {s.steps_total}",
                 "description": f"{where} ended with a non-zero exit status ({s.exit_code}): "
                                f"{(s.end_error or '')[:300]}.",
                 "hint": "The script gave up on purpose (sys.exit): its last log lines say why.",
                 "step": str(s.steps_total)},
                since=s.ended_at or now))
        elif s.status == RunStatus.STALLED:
            last = s.last_record_time or s.meta.start_time or now
            self._put(out, _Condition(
                self._labels("GradwatchRunStalled", s, "warning"),
                {"summary": f"Run {s.run} rank {s.rank} has sent nothing for {now - last:.0f} s (step {s.steps_total})",
                 "description": f"No record from {where} since step {s.steps_total}; the process is still there "
                                f"or on another host.",
                 "hint": "A hung data loader, a deadlocked collective (another rank died?) or a stuck filesystem; "
                         "py-spy dump --pid shows where it waits.",
                 "step": str(s.steps_total)},
                since=last))
        elif s.status == RunStatus.CRASHED:
            reason = (s.end_error or "the process exited without closing its probe")[:300]
            self._put(out, _Condition(
                self._labels("GradwatchRunCrashed", s, "critical"),
                {"summary": f"Run {s.run} rank {s.rank} crashed at step {s.steps_total}",
                 "description": f"{where} ended without finishing: {reason}.",
                 "hint": "Read the training log's last lines (OOM killer: dmesg); resume from the last checkpoint.",
                 "step": str(s.steps_total)},
                since=s.ended_at or now))

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> list[dict[str, Any]]:
        return [asdict(a) for a in self.active.values()]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.active = {}
        for item in state:
            alert = Alert(**item)
            self.active[alert.key] = alert
