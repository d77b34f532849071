"""Agent configuration: precedence of sources, and errors that name the field, value and source."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradwatch.agent.settings import DEFAULT_PORT, load_agent_config
from gradwatch.errors import ConfigError


def test_defaults_then_file_then_env_then_cli(tmp_path: Path) -> None:
    assert load_agent_config(env={}).port == DEFAULT_PORT != 9400  # 9400 belongs to the DCGM exporter
    config_file = tmp_path / "agent.yml"
    config_file.write_text("agent:\n  port: 9001\n  stall_after_seconds: 30\n  host: 0.0.0.0\n")
    config = load_agent_config(env={"GRADWATCH_PORT": "9002", "GRADWATCH_HOME": str(tmp_path)},
                               config_file=config_file, cli={"host": "127.0.0.2"})
    assert (config.port, config.stall_after_seconds, config.host, config.home) == (9002, 30.0, "127.0.0.2", tmp_path)
    assert load_agent_config(env={"GRADWATCH_CONFIG": str(config_file)}).port == 9001


def test_a_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"port = 'abc' \(environment variable GRADWATCH_PORT\): Input should be a "
                                          r"valid integer"):
        load_agent_config(env={"GRADWATCH_PORT": "abc"})


def test_every_problem_is_reported_at_once_with_its_source(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.yml"
    config_file.write_text("stall_after_seconds: -5\nprot: 1\n")
    with pytest.raises(ConfigError) as info:
        load_agent_config(env={}, config_file=config_file, cli={"port": "70000"})
    message = str(info.value)
    assert f"stall_after_seconds = -5 (config file {config_file}, key stall_after_seconds)" in message
    assert "greater than 0" in message
    assert f"unknown setting 'prot' (config file {config_file}, key prot); known settings: home, host, port" in message
    assert "port = '70000' (option --port): Input should be less than or equal to 65535" in message


@pytest.mark.parametrize("content, expected", [
    ("port: [1, 2", "is not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of settings, got list"),
])
def test_a_broken_file_is_named(tmp_path: Path, content: str, expected: str) -> None:
    config_file = tmp_path / "agent.yml"
    config_file.write_text(content)
    with pytest.raises(ConfigError, match=expected) as info:
        load_agent_config(env={}, config_file=config_file)
    assert str(config_file) in str(info.value)
    assert "<unicode string>" not in str(info.value)  # YAML's own position names the file too


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yml"):
        load_agent_config(env={}, config_file=tmp_path / "nope.yml")
