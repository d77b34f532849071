"""Deciding: feed a run's records to its rules and get decisions back. No I/O and no torch here;
the agent's dispatcher turns decisions into events and commands (agent/actions.py).

A decision's id is ``<rule>@<step>`` (``<rule>@<step>~<k>`` after the run's k-th resume, whose steps
repeat those after its checkpoint): the same records always give the same decisions with the same ids,
so a restarted agent that re-reads records cannot issue a command twice.

A run that resumes from a checkpoint gets its rules back as they were at that checkpoint
(``checkpoint_state`` / ``resume_from``), as torch's schedulers get theirs from the checkpoint:
detectors, counts towards ``max_actions``, cooldowns.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from gradwatch.rules.config import Rule, RulesConfig
from gradwatch.rules.detector_base import Observation, StepObservation, TickObservation, Trigger
from gradwatch.rules.detectors import Detector, make_detector
from gradwatch.spool.records import ActivationsRecord, LayersRecord

log = logging.getLogger("gradwatch.agent")


@dataclass(frozen=True)
class Decision:
    id: str
    run: str
    rule: str
    metric: str
    action: dict[str, Any]  # the rule's action, e.g. {"type": "reduce_lr", "factor": 0.5, ...}
    mode: str  # "act", "observe" or "dry_run" (a rule set to act while the global dry_run is on)
    reason: str  # bounded: the detector's reason (spike, plateau, patience_exhausted, ...)
    step: int  # the step of the record that triggered it
    t: float  # that record's time
    details: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "0"  # the optimizer whose series the rule watched
    target: str = ""  # the optimizer its reduce_lr cuts: the rule's, when it names one; "": every optimizer
    history: bool = False  # made on records of a run that had ended before the agent started: never sent

    @property
    def acts(self) -> bool:
        return self.mode == "act"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RuleFailure:
    """A rule whose detector raised on a run's value (a configuration the schema accepts, a case the detector
    did not foresee): the rule is disabled for that run; the agent reports it."""

    run: str
    rule: str
    step: int
    error: str


class RuleState:
    """One rule on one run: its detector, how often it fired, and when last."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.detector: Detector = make_detector(rule.detect)
        self.fired = 0  # decisions made
        self.triggered = 0  # times the detector fired (also while quiet: cooldown, max_actions)
        self.last_fired_step: int | None = None
        # the detector's latest trigger, even when cooldown or max_actions kept the rule quiet, and when its
        # condition was last seen holding (seen_t): alerts follow it
        self.last_trigger: dict[str, Any] | None = None
        # what became of its last command: {"step", "action", "status", "detail"} from the probe's ack
        self.last_outcome: dict[str, Any] | None = None
        self.failed: str | None = None  # why the rule failed on this run's values: it is disabled for the run

    def quiet(self, step: int) -> bool:
        rule = self.rule
        if rule.max_actions is not None and self.fired >= rule.max_actions:
            return True
        return self.last_fired_step is not None and step - self.last_fired_step < rule.cooldown_steps

    def _spec(self) -> dict[str, Any]:
        # what decides: a new alert severity alone keeps the detector's statistics; the default optimizer is left
        # out, so that checkpoints written before rules named optimizers still restore
        exclude = {"alert"} if "optimizer" in self.rule.model_fields_set and self.rule.optimizer != "0" \
            else {"alert", "optimizer"}
        return self.rule.model_dump(mode="json", exclude=exclude)

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self._spec(), "detector": self.detector.state_dict(),
                "fired": self.fired, "triggered": self.triggered, "last_fired_step": self.last_fired_step,
                "last_trigger": self.last_trigger,
                "last_outcome": self.last_outcome, "failed": self.failed}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore unless the rule changed since (then it starts afresh); True when restored."""
        if state.get("spec") != self._spec():
            return False
        self.detector.load_state_dict(state.get("detector", {}))
        self.fired = int(state.get("fired", 0))
        self.triggered = int(state.get("triggered", self.fired))
        self.last_fired_step = state.get("last_fired_step")
        self.last_trigger = state.get("last_trigger")
        outcome = state.get("last_outcome")
        self.last_outcome = outcome if isinstance(outcome, dict) else None
        failed = state.get("failed")
        self.failed = failed if isinstance(failed, str) else None
        return True


#: Actions that change the run's trajectory: until the probe acknowledges one, the records still come
#: from before it, and deciding on them again would apply it twice (two rewinds for one spike).
TRAJECTORY_ACTIONS = frozenset({"rewind", "reduce_lr"})


#: Steps after a run's first observation by which every metric its rules watch should have appeared.
UNSEEN_METRIC_STEPS = 500
_MAX_SEEN = 1024


class RunRules:
    """The rules of one run, fed with the records of its rank 0."""

    def __init__(self, run: str, config: RulesConfig, source: str, check_metrics: bool = True) -> None:
        self.run = run
        self.source = source  # "run" (given to attach) or "agent" (the agent's rules file)
        self.config = config
        # a rule on a metric the run never logs (a typo: val_los) never fires: say so once per run
        self.check_metrics = check_metrics  # False for the packaged defaults: not the user's rules
        self.metrics_seen: set[str] = set()
        self.first_step: int | None = None
        self.unseen_metrics: dict[str, str] = {}  # rule -> its metric, not seen UNSEEN_METRIC_STEPS into the run
        self.states = {rule.name: RuleState(rule) for rule in config.rules}
        self.decisions: dict[tuple[str, str, str], int] = {}  # (rule, action, mode) -> count
        self.recent: list[dict[str, Any]] = []  # the newest decisions, for `gradwatch status`
        self.awaiting: dict[str, str] = {}  # rule -> id of its trajectory command the probe has not acknowledged
        self.segment = 0  # resumes of the run so far: decision ids after the k-th end in ~k
        self.failures: list[RuleFailure] = []  # rules that failed since the agent last took them (take_failures)

    def reconfigure(self, config: RulesConfig) -> None:
        """New rules (a reloaded file): unchanged rules keep their state, changed ones restart."""
        old = self.state_dict()
        self.config = config
        self.states = {rule.name: RuleState(rule) for rule in config.rules}
        self.load_state_dict(old)

    def observe(self, step: int, t: float, values: dict[str, float], optimizer: str = "0",
                history: bool = False) -> list[Decision]:
        """Feed one record's observations (metric name -> value, as the agent's state interprets the
        record) of one optimizer's series ("0": the run's first) to the rules that watch it; returns the
        decisions they make. ``history``: the record is of a run that ended before the agent started; its
        decisions and triggers are marked so (never sent, never alerted)."""
        out: list[Decision] = []
        if self.check_metrics:
            self._note_metrics(step, values if optimizer == "0" else {f"{optimizer}/{k}": v for k, v in values.items()})
        observation: StepObservation | None = None
        for name, state in self.states.items():
            rule = state.rule
            if rule.optimizer != optimizer or step < rule.start_step or state.failed:
                continue
            inputs = state.detector.inputs
            if inputs:  # a catalogue rule reads the whole step
                if "step" not in inputs:
                    continue
                observation = observation or StepObservation(step, t, values)
                self._run_rule(out, name, state, step, t, history, observation=observation)
            elif rule.metric in values:
                self._run_rule(out, name, state, step, t, history, value=values[rule.metric])
        return out

    def observe_sample(self, record: LayersRecord | ActivationsRecord, history: bool = False) -> list[Decision]:
        """Feed a layer or activation sample of rank 0 to the catalogue rules that read them."""
        out: list[Decision] = []
        kind = "layers" if isinstance(record, LayersRecord) else "activations"
        for name, state in self.states.items():
            if kind in state.detector.inputs and record.step >= state.rule.start_step and not state.failed:
                self._run_rule(out, name, state, record.step, record.t, history, observation=record)
        return out

    @property
    def watches_time(self) -> bool:
        """Whether a rule fires on what does not arrive (``tick``): the agent then ticks this run."""
        return any("tick" in state.detector.inputs for state in self.states.values())

    def tick(self, observation: TickObservation) -> list[Decision]:
        """Feed the agent's clock to the rules that read it; their decisions are at the newest step."""
        out: list[Decision] = []
        for name, state in self.states.items():
            if "tick" in state.detector.inputs and not state.failed:
                self._run_rule(out, name, state, observation.step, observation.now, False, observation=observation)
        return out

    def _run_rule(self, out: list[Decision], name: str, state: RuleState, step: int, t: float, history: bool, *,
                  value: float = 0.0, observation: Observation | None = None) -> None:
        """One rule on a metric's ``value``, or (a catalogue rule) on an ``observation``."""
        try:
            trigger = state.detector.update(value) if observation is None else state.detector.observe(observation)
            decision = self._observe_rule(name, state, step, t, trigger, history)
        except Exception as exc:  # a rule that fails on a value must cost only itself, on this run
            state.failed = f"{type(exc).__name__}: {exc}"[:300]
            self.failures.append(RuleFailure(self.run, name, step, state.failed))  # the agent reports it
            return
        if decision is not None:
            out.append(decision)

    def _observe_rule(self, name: str, state: RuleState, step: int, t: float, trigger: Trigger | None,
                      history: bool) -> Decision | None:
        """What a rule makes of its detector's answer: its decision, if it makes one."""
        rule = state.rule
        if trigger is None:
            if state.last_trigger is not None and state.detector.holding():
                state.last_trigger["seen_t"] = t  # the condition goes on: its alert stays firing
            return None
        state.triggered += 1
        state.last_trigger = {"step": step, "t": t, "seen_t": t, "reason": trigger.reason,
                              "details": dict(trigger.details), **({"history": True} if history else {})}
        if state.quiet(step) or name in self.awaiting:
            return None  # awaiting: this record is from before the rule's last action took effect
        state.fired += 1
        state.last_fired_step = step
        mode = "act" if self.config.acting(rule) else "dry_run" if rule.mode == "act" else "observe"
        action = rule.action.model_dump(mode="json")
        key = (name, action["type"], mode)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        decision = Decision(id=f"{name}@{step}" + (f"~{self.segment}" if self.segment else ""), run=self.run,
                            rule=name, metric=rule.metric, action=action, mode=mode, reason=trigger.reason,
                            step=step, t=t, details=dict(trigger.details), optimizer=rule.optimizer,
                            target=rule.optimizer if "optimizer" in rule.model_fields_set else "", history=history)
        evidence = trigger.details.get("evidence")
        self.recent = (self.recent + [{"id": decision.id, "rule": name, "action": action["type"], "mode": mode,
                                       "reason": trigger.reason, "step": step,
                                       **({"evidence": evidence[:1000]} if isinstance(evidence, str) else {})}])[-10:]
        if decision.acts and action["type"] in TRAJECTORY_ACTIONS and not history:
            self.awaiting[name] = decision.id
        return decision

    def take_failures(self) -> list[RuleFailure]:
        out, self.failures = self.failures, []
        return out

    @property
    def failed_rules(self) -> dict[str, str]:
        """Rules disabled for this run, and why."""
        return {name: state.failed for name, state in self.states.items() if state.failed}

    def _note_metrics(self, step: int, values: dict[str, float]) -> None:
        if len(self.metrics_seen) < _MAX_SEEN:
            self.metrics_seen.update(values)
        if self.first_step is None:
            self.first_step = step
        if step - self.first_step < UNSEEN_METRIC_STEPS:
            return
        for name, state in self.states.items():
            if state.rule.catalogue:  # reads what its type implies, not a logged name
                continue
            metric = state.rule.metric if state.rule.optimizer == "0" else f"{state.rule.optimizer}/{state.rule.metric}"
            if metric not in self.metrics_seen and name not in self.unseen_metrics:
                self.unseen_metrics[name] = metric
                log.warning("run %s: rule %s watches metric %r, which the run has not recorded in %d steps; "
                            "it cannot fire (a typo? the run records: %s)", self.run, name, metric,
                            UNSEEN_METRIC_STEPS, ", ".join(sorted(self.metrics_seen)[:20]))

    def acknowledged(self, command_id: str, outcome: dict[str, Any] | None = None) -> None:
        """The probe acknowledged a command (applied, late, rejected or not taken): the records that follow
        come from after it, and its rule decides again. ``outcome`` ({"step", "action", "status", "detail"}):
        what became of it, which the rule's alert tells."""
        for name, awaited in list(self.awaiting.items()):
            if awaited == command_id:
                del self.awaiting[name]
        rule = command_id.rpartition("@")[0]
        if outcome is not None and rule in self.states:
            self.states[rule].last_outcome = outcome

    # -- checkpoints and resumes of the run -------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """What a run resumed from a checkpoint taken now gets back: each rule's detector, counts and cooldown."""
        return {name: state.state_dict() for name, state in self.states.items()}

    def resume_from(self, saved: dict[str, Any] | None) -> None:
        """The run resumed (a new process continues it): the rules as they were at its checkpoint (``saved``,
        from :meth:`checkpoint_state`; None: unknown, they go on as they are), a new decision-id segment, and
        nothing awaited from the processes before."""
        self.segment += 1
        self.awaiting = {}
        for name, rule_state in (saved or {}).items():
            if name in self.states:
                self.states[name].load_state_dict(rule_state)

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source, "segment": self.segment,
                "rules": {name: s.state_dict() for name, s in self.states.items()},
                "decisions": [[*key, n] for key, n in sorted(self.decisions.items())], "recent": self.recent,
                "awaiting": dict(self.awaiting), "unseen_metrics": dict(self.unseen_metrics),
                "first_step": self.first_step, "metrics_seen": sorted(self.metrics_seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, rule_state in state.get("rules", {}).items():
            if name in self.states:
                self.states[name].load_state_dict(rule_state)
        self.decisions = {(r, a, m): int(n) for r, a, m, n in state.get("decisions", [])}
        self.recent = list(state.get("recent", []))
        unseen, seen, first = state.get("unseen_metrics"), state.get("metrics_seen"), state.get("first_step")
        self.unseen_metrics = {name: metric for name, metric in unseen.items()  # rules unchanged since
                               if name in self.states and self.states[name].rule.metric == metric} \
            if isinstance(unseen, dict) else {}
        self.metrics_seen = {str(m) for m in seen[:_MAX_SEEN]} if isinstance(seen, list) else set()
        self.first_step = first if isinstance(first, int) else None
        awaiting = state.get("awaiting")
        self.awaiting = {str(k): str(v) for k, v in awaiting.items() if k in self.states} \
            if isinstance(awaiting, dict) else {}
        segment = state.get("segment", self.segment)
        self.segment = segment if isinstance(segment, int) and segment >= 0 else 0
