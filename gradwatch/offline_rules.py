"""The agent's rules over a recorded run, offline: the same interpretation of each record (agent/state.py) and the
same engine (rules/engine.py) as the live agent, so ``gradwatch inspect`` reports the firings the agent made or
would have made, at the same steps. Deciding only: nothing is sent, nothing is written."""

from __future__ import annotations

from gradwatch.agent.state import RankState
from gradwatch.history import RankHistory
from gradwatch.rules.catalogue_specs import catalogue_rules_text
from gradwatch.rules.config import RulesConfig, parse_rules
from gradwatch.rules.engine import Decision, RunRules
from gradwatch.spool.records import ActivationsRecord, LayersRecord, StepRecord


def catalogue() -> RulesConfig:
    return parse_rules(catalogue_rules_text(), "<the catalogue at its defaults>")


def replay(rank: RankHistory, config: RulesConfig | None = None) -> list[Decision]:
    """The decisions ``config`` (default: the whole catalogue) makes on one rank's records, in order."""
    rules = RunRules(rank.meta.run, config or catalogue(), "inspect", check_metrics=False)
    state = RankState(run=rank.meta.run, rank=rank.rank, meta=rank.meta, spike_window=60.0)
    out: list[Decision] = []
    for record in rank.records:
        observed = state.apply(record)
        if isinstance(record, (LayersRecord, ActivationsRecord)):
            out += rules.observe_sample(record)
        if observed:
            optimizer = record.opt if isinstance(record, StepRecord) and record.opt else "0"
            out += rules.observe(record.step, record.t, observed, optimizer)
    return out
