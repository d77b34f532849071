"""Rules and settings files cannot cost more than their size: a size cap, and aliases that cannot nest
into billions of nodes (a 334-byte file of nested aliases stood for 387 million)."""

from __future__ import annotations

import itertools
import resource
import time
from pathlib import Path

import pytest

from gradwatch.agent.rules import AgentRules
from gradwatch.agent.settings import load_agent_config
from gradwatch.errors import ConfigError
from gradwatch.rules.bounded_yaml import MAX_YAML_BYTES
from gradwatch.rules.config import load_rules, parse_rules

LEVELS = "abcdefghi"


def alias_bomb(levels: int = 9) -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in itertools.pairwise(LEVELS[:levels]):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nrules: []\n"


def test_nested_aliases_are_refused_before_they_expand() -> None:
    text = alias_bomb()
    assert len(text) < 400
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match=r"rules.yaml: its YAML aliases \(\*name\) expand to more than 100000 nodes"):
        parse_rules(text, "rules.yaml")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: nothing was expanded


def test_aliases_within_the_bound_still_work() -> None:
    config = parse_rules("rules:\n  - &r {name: a, metric: loss, detect: {type: plateau, patience: 5}, "
                         "action: {type: stop}}\n  - {<<: *r, name: b}\n", "rules.yaml")
    assert [r.name for r in config.rules] == ["a", "b"] and config.rules[1].detect == config.rules[0].detect


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("rules: []\n" + "#" * MAX_YAML_BYTES)
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        load_rules(path)


def test_an_agent_reload_of_an_alias_bomb_keeps_the_rules_in_force(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: a, metric: loss, detect: {type: nonfinite}, action: {type: stop}}\n")
    rules = AgentRules.from_file(path)
    path.write_text(alias_bomb())
    started = time.process_time()
    assert rules.reload() is False
    assert time.process_time() - started < 5  # CPU seconds: refused at once, not expanded
    assert [r.name for r in rules.config.rules] == ["a"] and rules.reloads["rejected"] == 1
    assert "expand to more than" in (rules.last_error or "")


def test_a_settings_file_of_nested_aliases_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(alias_bomb().replace("rules: []", "port: 9999"))
    with pytest.raises(ConfigError, match=r"config file .*agent.yaml: its YAML aliases"):
        load_agent_config(config_file=path, env={})
