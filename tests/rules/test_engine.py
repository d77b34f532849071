"""RunRules: a rule whose action changes the run's trajectory waits for its acknowledgement."""

from __future__ import annotations

from gradwatch.rules.config import RulesConfig
from gradwatch.rules.engine import RunRules


def _rules(action: dict[str, object]) -> RunRules:
    config = RulesConfig.model_validate({"rules": [{"name": "r", "metric": "loss", "action": action, "mode": "act",
                                                    "detect": {"type": "threshold", "above": 10.0}}]})
    return RunRules("run", config, "run")


LOSSES = [50.0, 1.0, 50.0, 1.0, 50.0]  # the threshold detector triggers on each crossing


def test_a_rewind_is_decided_once_until_the_probe_acknowledges_it() -> None:
    rules = _rules({"type": "rewind", "skip_steps": 1, "min_back_steps": 1})
    decided = [d.step for step, loss in enumerate(LOSSES, 1) for d in rules.observe(step, float(step), {"loss": loss})]
    assert decided == [1]  # the records up to 5 are from before the rewind took effect
    restored = RunRules("run", rules.config, "run")
    restored.load_state_dict(rules.state_dict())  # an agent restart keeps the wait
    assert restored.observe(6, 6.0, {"loss": 1.0}) == [] and restored.observe(7, 7.0, {"loss": 50.0}) == []
    restored.acknowledged("r@1")
    restored.observe(8, 8.0, {"loss": 1.0})
    assert [d.id for d in restored.observe(9, 9.0, {"loss": 50.0})] == ["r@9"]


def test_a_stop_does_not_wait() -> None:
    rules = _rules({"type": "stop"})
    decided = [d.step for step, loss in enumerate(LOSSES, 1) for d in rules.observe(step, float(step), {"loss": loss})]
    assert decided == [1, 3, 5]


def test_a_rule_watches_the_optimizer_it_names_and_its_cut_targets_that_optimizer_only() -> None:
    config = RulesConfig.model_validate({"rules": [
        {"name": "d", "metric": "loss", "detect": {"type": "threshold", "above": 1.0},
         "action": {"type": "reduce_lr"}, "mode": "act"},
        {"name": "g", "metric": "loss", "optimizer": "1", "detect": {"type": "threshold", "above": 1.0},
         "action": {"type": "reduce_lr"}, "mode": "act"}]})
    rules = RunRules("run", config, "run")
    assert [(d.rule, d.target) for d in rules.observe(1, 1.0, {"loss": 5.0}, optimizer="1")] == [("g", "1")]
    [decision] = rules.observe(2, 2.0, {"loss": 5.0})  # optimizer "0", the default
    assert decision.rule == "d" and decision.target == "", "a rule naming no optimizer cuts every optimizer's LR"
    assert rules.observe(3, 3.0, {"loss": 5.0}, optimizer="2") == []
    assert rules.observe(4, 4.0, {"loss": 5.0}, optimizer="1") == []  # g waits for its acknowledgement
