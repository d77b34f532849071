"""The agent's dispatcher: decisions become events and commands, once, with a common step for all ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradwatch.agent.actions import RANKS_WAIT_SECONDS, ActionDispatcher
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.rules import AgentRules
from gradwatch.agent.state import AgentState
from gradwatch.rules.config import parse_rules
from gradwatch.spool.format import SpoolLayout
from tests.agent.helpers import FakeClock, SpoolBuilder

RULES = """
rules:
  - name: hot
    metric: loss
    detect: {type: threshold, above: 5}
    action: {type: reduce_lr, factor: 0.5}
    mode: act
"""


def _agent(home: Path, clock: FakeClock) -> tuple[AgentState, SpoolIngestor, ActionDispatcher]:
    state = AgentState(spike_window=60.0, rules=AgentRules(parse_rules(RULES, "rules.yaml"), None))
    ingestor = SpoolIngestor(SpoolLayout(home), state, clock)
    return state, ingestor, ActionDispatcher(SpoolLayout(home), state, lead_seconds=0.15, min_lead_steps=2,
                                             clock=clock)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_multi_rank_command_is_scheduled_ahead_at_the_pace_of_the_run(isolated_home: Path) -> None:
    spool, clock = SpoolBuilder(isolated_home), FakeClock(1_000_000.0 + 10.0)
    for rank in (0, 1):
        spool.start("ddp", rank=rank, world_size=2)
        spool.steps("ddp", rank, 1, 99)  # 0.1 s a step; the last step record at t0 + 9.9
    spool.steps("ddp", 0, 100, 100, loss=9.0)
    _, ingestor, dispatcher = _agent(isolated_home, clock)
    ingestor.scan_all()
    dispatcher.dispatch(ingestor.take_outbox())
    [command] = _lines(SpoolLayout.commands_file(spool.layout.run_dir("ddp")))
    # ranks are at step 100 now (records 0.0-0.1 s old); 0.15 s ahead at 0.1 s a step -> 2 steps
    assert (command["id"], command["trigger_step"], command["apply_at_step"]) == ("hot@100", 100, 102)
    [event] = _lines(SpoolLayout.events_file(spool.layout.run_dir("ddp")))
    assert event["event"] == "decision" and event["sent"] and event["apply_at_step"] == 102


def test_an_agent_that_does_not_see_every_rank_records_but_does_not_act(isolated_home: Path) -> None:
    spool, clock = SpoolBuilder(isolated_home), FakeClock()
    spool.start("multinode", rank=0, world_size=4)  # ranks 2 and 3 live on another node
    spool.start("multinode", rank=1, world_size=4)
    spool.steps("multinode", 0, 1, 3, loss=9.0)
    _, ingestor, dispatcher = _agent(isolated_home, clock)
    ingestor.scan_all()
    dispatcher.dispatch(ingestor.take_outbox())
    run_dir = spool.layout.run_dir("multinode")
    assert dispatcher.waiting == 1 and not SpoolLayout.events_file(run_dir).exists()  # they may yet appear
    clock.advance(RANKS_WAIT_SECONDS + 1)
    dispatcher.dispatch(ingestor.take_outbox())
    assert not SpoolLayout.commands_file(run_dir).exists()
    [event] = _lines(SpoolLayout.events_file(run_dir))
    assert event["sent"] is False and "sees 2 of 4 ranks" in event["note"] and dispatcher.waiting == 0


def test_a_decision_made_before_the_other_ranks_appear_waits_for_them(isolated_home: Path) -> None:
    """Under load rank 1 of a starting run writes its first files a moment after rank 0's first steps: a rule
    that fires on those steps acts once every rank is there, in the order the decisions were made."""
    spool, clock = SpoolBuilder(isolated_home), FakeClock()
    spool.start("ddp", rank=0, world_size=2)
    spool.steps("ddp", 0, 1, 3, loss=9.0)
    _, ingestor, dispatcher = _agent(isolated_home, clock)
    ingestor.scan_all()
    dispatcher.dispatch(ingestor.take_outbox())
    assert dispatcher.waiting == 1
    spool.start("ddp", rank=1, world_size=2)
    spool.steps("ddp", 1, 1, 3, loss=9.0)
    clock.advance(5)
    ingestor.scan_all()
    dispatcher.dispatch(ingestor.take_outbox())
    run_dir = spool.layout.run_dir("ddp")
    [command] = _lines(SpoolLayout.commands_file(run_dir))
    assert command["id"] == "hot@1" and command["apply_at_step"] > 3 and dispatcher.waiting == 0
    [event] = _lines(SpoolLayout.events_file(run_dir))
    assert event["sent"] is True


def test_redeciding_after_a_restart_writes_nothing_twice(isolated_home: Path) -> None:
    spool, clock = SpoolBuilder(isolated_home), FakeClock()
    spool.start("solo")
    spool.steps("solo", 0, 1, 5, loss=9.0)
    for _ in range(2):  # a second agent without the first one's checkpoint re-reads everything
        _, ingestor, dispatcher = _agent(isolated_home, clock)
        ingestor.scan_all()
        dispatcher.dispatch(ingestor.take_outbox())
    run_dir = spool.layout.run_dir("solo")
    commands = _lines(SpoolLayout.commands_file(run_dir))
    assert [c["id"] for c in commands] == ["hot@1"] and commands[0]["apply_at_step"] is None
    assert [e["id"] for e in _lines(SpoolLayout.events_file(run_dir))] == ["hot@1"]
