"""One run's failure in any per-run step of the agent costs only that run: ingest (a record that cannot be
applied), rules (a detector that raises), state refresh, alerts, the scrape, the checkpoint.

The failures are made by patching one function to raise for one run: after the typed record contract and
the property tests no real input is known to make these steps raise, so a patched raise stands for the bug
not yet found (tests/agent/test_hostile_spool.py feeds the real hostile inputs to a real agent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.actions import ActionDispatcher
from gradwatch.agent.alerts import AlertTracker
from gradwatch.agent.checkpoint import load_checkpoint, save_checkpoint
from gradwatch.agent.collector import AgentCollector
from gradwatch.agent.faults import Stage
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.rules import AgentRules
from gradwatch.agent.state import AgentState, RankState
from gradwatch.rules import detectors
from gradwatch.rules.config import parse_rules
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.records import LayersRecord
from tests.agent.helpers import FakeClock, SpoolBuilder
from tests.conftest import parse_metrics

RULES = """
rules:
  - name: boom
    metric: loss
    detect: {type: threshold, above: 5.5}
    action: {type: stop}
  - name: fine
    metric: loss
    detect: {type: threshold, above: 5}
    action: {type: stop}
"""


def _agent(home: Path) -> tuple[SpoolBuilder, AgentState, SpoolIngestor, FakeClock]:
    clock = FakeClock()
    state = AgentState(spike_window=60.0, rules=AgentRules(parse_rules(RULES, "rules.yaml"), None))
    return SpoolBuilder(home), state, SpoolIngestor(SpoolLayout(home), state, clock), clock


def _two_runs(spool: SpoolBuilder) -> None:
    for run in ("bad", "good"):
        spool.start(run)
        spool.steps(run, 0, 1, 20, loss=9.0, nan_every=4)


def _scrape(state: AgentState, clock: FakeClock) -> dict[Any, float]:
    return parse_metrics(AgentCollector(state, clock).exposition().decode())


def _steps(samples: dict[Any, float], run: str) -> float | None:
    return samples.get(("gradwatch_steps_total", frozenset({("run", run), ("rank", "0"), ("optimizer", "0")})))


def test_a_rule_that_raises_is_disabled_for_the_run_and_reported(isolated_home: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    original = detectors.ThresholdDetector.update

    def update(self: detectors.ThresholdDetector, value: float) -> Any:
        if self.spec.above == 5.5:
            raise ZeroDivisionError("a case the detector did not foresee")
        return original(self, value)

    monkeypatch.setattr(detectors.ThresholdDetector, "update", update)
    spool, state, ingest, clock = _agent(isolated_home)
    _two_runs(spool)
    ingest.scan_all()
    outbox = ingest.take_outbox()
    for run in ("bad", "good"):
        rules = state.rules.runs[run]
        assert list(rules.failed_rules) == ["boom"]  # disabled on the run, once
        # the other rule goes on: it fires each time the loss is back above 5 after a NaN
        assert rules.decisions == {("fine", "stop", "observe"): 5}
        assert state.rank(run, 0).steps_total == 20 and state.rank(run, 0).nonfinite["loss"] == 5  # type: ignore[union-attr]
    assert state.faults.faulty_by_stage()[Stage.RULES] == 2
    ActionDispatcher(SpoolLayout(isolated_home), state, 0.15, 2, clock).dispatch(outbox)
    events = [json.loads(line) for line in SpoolLayout.events_file(spool.layout.run_dir("bad")).read_text().splitlines()]
    assert sorted((e["event"], e.get("rule")) for e in events) == [("decision", "fine")] * 5 + [("rule_failed", "boom")]
    [failed] = [e for e in events if e["event"] == "rule_failed"]
    assert failed["step"] == 1 and "ZeroDivisionError" in failed["error"]
    # a restarted agent keeps the rule disabled (its checkpoint holds why)
    save_checkpoint(spool.layout.checkpoint_file, state)
    _, restarted, _, _ = _agent(isolated_home)
    assert load_checkpoint(spool.layout.checkpoint_file, restarted)
    rank0 = restarted.rank("bad", 0)
    assert rank0 is not None and list(restarted.rules.for_run("bad", rank0.meta).failed_rules) == ["boom"]


def test_a_record_the_agent_cannot_apply_is_skipped_once_and_the_rest_are_applied(
        isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: RankState, record: LayersRecord) -> None:
        self.layers_step = record.step  # half-applied, then raises
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(RankState, "_apply_layers", broken)
    spool, state, ingest, _ = _agent(isolated_home)
    spool.start("r")
    spool.steps("r", 0, 1, 10, nan_every=2)
    spool.append("r", 0, LayersRecord(step=10, t=1_000_001.0, layers=["a"], grad_norm=[1.0]))
    spool.steps("r", 0, 11, 20, nan_every=2)
    for _ in range(3):  # rescans read nothing twice
        ingest.scan_all()
    s = state.rank("r", 0)
    assert s is not None and s.steps_total == 20 and s.nonfinite["loss"] == 10
    assert state.counters.records_rejected == {"unprocessable": 1}
    assert state.counters.records_ingested == 41


def test_a_run_whose_series_cannot_be_made_is_left_out_of_the_scrape_alone(isolated_home: Path) -> None:
    spool, state, ingest, clock = _agent(isolated_home)
    _two_runs(spool)
    ingest.scan_all()
    state.rank("bad", 0).learning_rates = ["not a number"]  # type: ignore[list-item,union-attr]
    samples = _scrape(state, clock)
    assert _steps(samples, "good") == 20 and _steps(samples, "bad") is None  # none of its series, not half of them
    assert not any(labels and ("run", "bad") in labels for (_, labels) in samples)
    assert samples[("gradwatch_agent_runs_faulty", frozenset({("stage", "collect")}))] == 1
    state.rank("bad", 0).learning_rates = [0.1]  # type: ignore[union-attr]
    samples = _scrape(state, clock)
    assert _steps(samples, "bad") == 20
    assert samples[("gradwatch_agent_runs_faulty", frozenset({("stage", "collect")}))] == 0
    assert samples[("gradwatch_agent_run_faults_total", frozenset({("stage", "collect")}))] == 1


def test_a_run_whose_state_cannot_be_decided_keeps_the_others_going(isolated_home: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spool, state, ingest, clock = _agent(isolated_home)
    _two_runs(spool)
    spool.end("good", 0, 20)
    ingest.scan_all()
    original = RankState.refresh_status

    def refresh(self: RankState, *args: Any) -> Any:
        if self.run == "bad":
            raise TypeError("'<' not supported between instances of 'str' and 'float'")
        return original(self, *args)

    monkeypatch.setattr(RankState, "refresh_status", refresh)
    state.refresh(clock(), 120.0, 900.0, "")
    assert state.rank("good", 0).status.value == "finished"  # type: ignore[union-attr]
    assert [f["stage"] for f in state.faults.of_run("bad")] == ["refresh"]
    assert state.summary(clock())[0]["faults"] == [
        {"stage": "refresh", "message": "TypeError: '<' not supported between instances of 'str' and 'float'",
         "failures": 1}]


def test_a_run_whose_alerts_cannot_be_evaluated_keeps_its_alerts_and_the_others_go_on(
        isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, state, ingest, clock = _agent(isolated_home)
    _two_runs(spool)
    ingest.scan_all()
    tracker = AlertTracker(resolve_after=300.0)
    fired = tracker.evaluate(state, clock())
    assert {(a.labels["run"], a.name) for a in fired} >= {("bad", "GradwatchFine"), ("good", "GradwatchFine")}
    original = AlertTracker._state_alerts

    def state_alerts(self: AlertTracker, out: Any, s: RankState, now: float) -> None:
        if s.run == "bad":
            raise KeyError("seen_t")
        original(self, out, s, now)

    monkeypatch.setattr(AlertTracker, "_state_alerts", state_alerts)
    changes = tracker.evaluate(state, clock())
    assert changes == []  # nothing resolved falsely: the failing run's alerts stay as they were
    assert {a.labels["run"] for a in tracker.firing()} == {"bad", "good"}
    assert [f["stage"] for f in state.faults.of_run("bad")] == ["alerts"]


def test_one_runs_unusable_checkpoint_entry_costs_only_that_run(isolated_home: Path) -> None:
    spool, state, ingest, _ = _agent(isolated_home)
    _two_runs(spool)
    ingest.scan_all()
    save_checkpoint(spool.layout.checkpoint_file, state)
    saved = json.loads(spool.layout.checkpoint_file.read_text())
    saved["runs"]["bad"]["0"]["meta"] = "not metadata"
    spool.layout.checkpoint_file.write_text(json.dumps(saved))
    _, restarted, ingest2, _ = _agent(isolated_home)
    assert load_checkpoint(spool.layout.checkpoint_file, restarted)
    assert restarted.rank("good", 0).offset == state.rank("good", 0).offset  # type: ignore[union-attr]
    assert restarted.rank("bad", 0) is None
    ingest2.scan_all()  # the bad run is read again from its start: its counts are exact, not doubled
    assert restarted.rank("bad", 0).steps_total == 20 and restarted.rank("bad", 0).nonfinite["loss"] == 5  # type: ignore[union-attr]
    assert restarted.rank("good", 0).nonfinite["loss"] == 5  # type: ignore[union-attr]
