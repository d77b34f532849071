"""Deciding alerts: rule detectors and run states become alerts that fire once and resolve when clear."""

from __future__ import annotations

from pathlib import Path

from gradwatch.agent.actions import ActionDispatcher
from gradwatch.agent.alerts import AlertTracker, alert_name
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.rules import AgentRules
from gradwatch.agent.state import AgentState
from gradwatch.rules.config import parse_rules
from gradwatch.spool.format import SpoolLayout
from tests.agent.helpers import FakeClock, SpoolBuilder

RULES = """
rules:
  - name: loss-too-high
    metric: loss
    detect: {type: threshold, above: 5}
    action: {type: stop}
    alert: critical
    max_actions: 1
  - name: quiet-one
    metric: loss
    detect: {type: threshold, above: 5}
    action: {type: stop}
    alert: none
"""
T0 = 1_000_000.0


def _setup(home: Path, clock: FakeClock, rules: str = RULES) -> tuple[AgentState, SpoolIngestor, AlertTracker]:
    state = AgentState(spike_window=60.0, rules=AgentRules(parse_rules(rules, "rules.yaml"), None))
    return state, SpoolIngestor(SpoolLayout(home), state, clock), AlertTracker(resolve_after=30.0)


def _one_firing_alert(home: Path, clock: FakeClock) -> tuple[AgentState, SpoolIngestor, AlertTracker, SpoolBuilder]:
    """Run r1 with its loss over the threshold from step 1 to 51, ingested and evaluated once."""
    spool = SpoolBuilder(home)
    spool.start("r1")
    spool.steps("r1", 0, 1, 51, loss=9.0)
    state, ingestor, tracker = _setup(home, clock)
    ingestor.scan_all()
    return state, ingestor, tracker, spool


def test_alert_names_follow_the_rule_names() -> None:
    assert alert_name("loss-spike") == "GradwatchLossSpike"
    assert alert_name("grad_norm.high") == "GradwatchGradNormHigh"


def test_a_rule_alert_fires_once_names_the_run_and_resolves_after_a_quiet_spell(isolated_home: Path) -> None:
    spool, clock = SpoolBuilder(isolated_home), FakeClock(T0 + 7)  # step n is at T0 + n/10
    spool.start("r1")
    spool.steps("r1", 0, 1, 50)
    spool.steps("r1", 0, 51, 60, loss=9.0)  # over the threshold for 10 steps; the rule acts once (max_actions)
    state, ingestor, tracker = _setup(isolated_home, clock)
    ingestor.scan_all()
    [alert] = tracker.evaluate(state, clock())
    # a rule of the user's own: its runbook is the section on the agent's rule alerts
    assert alert.annotations["runbook_url"].endswith("/alerts.md#the-agents-alerts")
    assert alert.annotations["dashboard_url"].endswith("/d/gradwatch-run?var-run=r1&var-rank=0")
    assert alert.labels == {"alertname": "GradwatchLossTooHigh", "run": "r1", "rank": "0", "severity": "critical",
                            "source": "agent"}
    assert alert.firing and "Run r1" in alert.annotations["summary"] and "step 51" in alert.annotations["summary"]
    assert alert.annotations["hint"] and alert.starts_at == T0 + 5.1  # the first trigger, step 51
    assert tracker.evaluate(state, clock()) == []  # still firing: not reported again
    clock.advance(20)
    assert tracker.evaluate(state, clock()) == []  # the loss was over the threshold until step 60: 21 s ago
    spool.steps("r1", 0, 61, 62, t0=T0)  # back under the threshold
    ingestor.scan_all()
    clock.advance(8)
    assert tracker.evaluate(state, clock()) == []  # 29 s since it last held
    clock.advance(2)
    [resolved] = tracker.evaluate(state, clock())
    assert (resolved.name, resolved.firing, resolved.ends_at) == ("GradwatchLossTooHigh", False, clock())
    assert tracker.firing() == []


def test_a_later_trigger_keeps_one_alert_with_the_newest_text(isolated_home: Path) -> None:
    clock = FakeClock(T0 + 20)
    state, ingestor, tracker, spool = _one_firing_alert(isolated_home, clock)
    [first] = tracker.evaluate(state, clock())
    spool.steps("r1", 0, 52, 60, loss=1.0)
    spool.steps("r1", 0, 61, 61, loss=9.0)  # a second crossing
    ingestor.scan_all()
    assert tracker.evaluate(state, clock()) == []
    [now] = tracker.firing()
    assert now.starts_at == first.starts_at and "step 61" in now.annotations["summary"]


def test_stalled_and_crashed_ranks_raise_their_alerts(isolated_home: Path) -> None:
    spool, clock = SpoolBuilder(isolated_home), FakeClock(T0 + 10)
    spool.start("stuck", host="elsewhere")
    spool.steps("stuck", 0, 1, 20)
    spool.start("dead", host="elsewhere")
    spool.steps("dead", 0, 1, 20)
    spool.end("dead", 0, 20, status="failed", t=T0 + 2.5)
    state, ingestor, tracker = _setup(isolated_home, clock)
    ingestor.scan_all()
    clock.advance(200)
    state.refresh(clock(), stall_after=120, ended_ttl=900, local_host="here")
    alerts = {a.name: a for a in tracker.evaluate(state, clock())}
    assert set(alerts) == {"GradwatchRunStalled", "GradwatchRunCrashed"}
    assert alerts["GradwatchRunStalled"].labels["run"] == "stuck"
    assert alerts["GradwatchRunStalled"].labels["severity"] == "warning"
    assert alerts["GradwatchRunCrashed"].labels | {} == {"alertname": "GradwatchRunCrashed", "run": "dead", "rank": "0",
                                                         "severity": "critical", "source": "agent"}
    assert "crashed at step 20" in alerts["GradwatchRunCrashed"].annotations["summary"]
    crashed = alerts["GradwatchRunCrashed"]
    assert crashed.annotations["runbook_url"].endswith("/alerts.md#gradwatchruncrashed")
    assert crashed.annotations["dashboard_url"].endswith(
        f"/d/gradwatch-run?var-run={crashed.labels['run']}&var-rank={crashed.labels['rank']}")
    # the stalled run comes back: its alert resolves; the crashed run's alert stays until it is retired
    spool.steps("stuck", 0, 21, 22, t0=clock() - 2.2)
    ingestor.scan_all()
    state.refresh(clock(), stall_after=120, ended_ttl=900, local_host="here")
    [resolved] = tracker.evaluate(state, clock())
    assert (resolved.name, resolved.firing) == ("GradwatchRunStalled", False)
    clock.advance(1000)
    spool.steps("stuck", 0, 23, 23, t0=clock() - 2.3)
    ingestor.scan_all()
    state.refresh(clock(), stall_after=120, ended_ttl=900, local_host="here")
    [gone] = tracker.evaluate(state, clock())
    assert (gone.name, gone.firing) == ("GradwatchRunCrashed", False)


def test_firing_alerts_survive_a_restart_and_are_resolved_by_the_next_agent(isolated_home: Path) -> None:
    clock = FakeClock(T0 + 20)
    state, _, tracker, _ = _one_firing_alert(isolated_home, clock)
    [fired] = tracker.evaluate(state, clock())
    saved_state, saved_alerts = state.state_dict(), tracker.state_dict()
    state2, _, tracker2 = _setup(isolated_home, clock)
    state2.load_state_dict(saved_state)
    tracker2.load_state_dict(saved_alerts)
    assert tracker2.evaluate(state2, clock()) == []  # the same alert, not a new one
    clock.advance(60)
    [resolved] = tracker2.evaluate(state2, clock())
    assert resolved.key == fired.key and not resolved.firing and resolved.starts_at == fired.starts_at


def test_carried_out_actions_become_one_note_per_command(isolated_home: Path) -> None:
    spool, clock = SpoolBuilder(isolated_home), FakeClock(T0 + 20)
    for rank in (0, 1):
        spool.start("ddp", rank=rank, world_size=2)
        spool.steps("ddp", rank, 1, 10)
        spool.append("ddp", rank, {"kind": "ack", "step": 12, "t": T0 + 1.2, "id": "hot@10", "action": "reduce_lr",
                                   "rule": "hot", "reason": "threshold", "apply_at_step": 12, "status": "applied",
                                   "detail": "lr 0.1 -> 0.05"})
    spool.append("ddp", 0, {"kind": "step", "step": 11, "t": T0 + 1.1, "grad_norm": float("nan"), "lr": [0.1],
                            "dur": 0.1, "skip": "nonfinite"})
    state, ingestor, _ = _setup(isolated_home, clock)
    dispatcher = ActionDispatcher(SpoolLayout(isolated_home), state, 0.15, 2, clock)
    ingestor.scan_all()
    notes = dispatcher.dispatch(ingestor.take_outbox())
    assert sorted((n.action, n.reason, n.step) for n in notes) == [("reduce_lr", "threshold", 12),
                                                                   ("skip_step", "nonfinite", 11)]
    ingestor.scan_all()  # nothing new: nothing noted twice
    assert dispatcher.dispatch(ingestor.take_outbox()) == []
