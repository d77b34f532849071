"""Rules files: defaults, validation errors that point at the line, rules given in Python, the CLI check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.errors import ConfigError
from gradwatch.rules import RulesConfig, default_rules, load_rules, rules_from
from gradwatch.rules.config import parse_rules

GOOD = """\
dry_run: false
guards:
  clip: {scheme: autoclip, percentile: 10}
rules:
  - name: plateau
    metric: val_loss
    detect: {type: plateau, patience: 5}
    action: {type: reduce_lr, factor: 0.5}
    mode: act
"""


def test_the_shipped_defaults_load_and_only_the_nonfinite_skip_acts() -> None:
    config = default_rules()
    assert config.rules, "the package ships rules"
    assert not any(config.acting(rule) for rule in config.rules), "shipped rules only observe"
    assert config.guards.skip.on_nonfinite == "act"
    assert config.guards.skip.on_spike == "off" and config.guards.clip.scheme == "none"
    assert not config.snapshots_enabled


def test_a_good_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    config = load_rules(path)
    assert config.guards.clip.scheme == "autoclip"
    assert config.rules[0].detect.type == "plateau" and config.acting(config.rules[0])


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace("patience: 5", "patience: five"), ["line 7", "rules[0].detect.patience", "'five'", "integer"]),
    (GOOD.replace("type: plateau", "type: plato"), ["line 7", "rules[0].detect.type", "'plato'", "'plateau'"]),
    (GOOD.replace("scheme: autoclip", "scheme: autoclp"), ["line 3", "guards.clip.scheme", "'autoclip'"]),
    (GOOD.replace("mode: act", "mood: act"), ["line 9", "rules[0].mood", "unknown field"]),
    (GOOD.replace("factor: 0.5", "factor: 1.5"), ["line 8", "rules[0].action.factor", "less than 1"]),
    (GOOD + "  - name: plateau\n    metric: x\n    detect: {type: nonfinite}\n    action: {type: stop}\n",
     ["used twice"]),
    ("rules:\n  - name: t\n    metric: x\n    detect: {type: threshold}\n    action: {type: stop}\n",
     ["line 4", "exactly one of 'above' or 'below'"]),
    ("rules: [unclosed\n", ["not valid YAML", "line 2"]),
])
def test_errors_name_the_file_the_line_the_field_and_what_was_expected(tmp_path: Path, text: str,
                                                                       expected: list[str]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"
    assert "<unicode string>" not in message


def test_unquoted_off_is_read_as_off() -> None:
    config = parse_rules("guards:\n  skip:\n    on_nonfinite: off\n", "x.yaml")
    assert config.guards.skip.on_nonfinite == "off"


def test_rules_given_in_python() -> None:
    as_dict = rules_from({"rules": [{"name": "s", "metric": "loss", "detect": {"type": "spike"},
                                     "action": {"type": "stop"}, "mode": "act"}]})
    assert isinstance(as_dict, RulesConfig) and as_dict.rules[0].detect.z_threshold == 6.0
    assert rules_from(as_dict) is as_dict
    with pytest.raises(ConfigError, match=r"rules given in Python.*rules\[0\]\.detect\.z_threshold"):
        rules_from({"rules": [{"name": "s", "metric": "loss", "detect": {"type": "spike", "z_threshold": -1},
                               "action": {"type": "stop"}}]})


def test_dry_run_turns_every_acting_rule_and_guard_into_observe() -> None:
    from gradwatch.probes.guards import GradientGuards

    config = parse_rules(GOOD.replace("dry_run: false", "dry_run: true"), "x.yaml")
    assert not config.acting(config.rules[0])
    guards = GradientGuards(config.guards, config.dry_run)
    assert (guards.skip_nonfinite, guards.clip_mode) == ("observe", "observe")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True, timeout=60)


def test_cli_check_lists_a_good_file_and_reports_a_bad_one_in_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    done = _cli("rules", "check", str(good))
    assert done.returncode == 0, done.stderr
    assert "plateau" in done.stdout and "reduce_lr" in done.stdout and "act" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("patience: 5", "patience: -5"))
    done = _cli("rules", "check", str(bad))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "line 7: rules[0].detect.patience = -5" in done.stderr


def test_cli_prints_the_defaults_as_a_valid_rules_file(tmp_path: Path) -> None:
    done = _cli("rules", "defaults")
    assert done.returncode == 0
    path = tmp_path / "defaults.yaml"
    path.write_text(done.stdout)
    assert load_rules(path) == default_rules()
