"""Agent configuration: defaults < YAML file < environment < command line, validated once.

A bad value is reported with the field, the value and where it came from, e.g.
``port = 'abc' (from environment variable GRADWATCH_PORT): Input should be a valid integer``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from gradwatch.agent.links import DEFAULT_DOCS_URL, DEFAULT_GRAFANA_URL, AlertLinks, without_credentials
from gradwatch.agent.redact import redact_url
from gradwatch.errors import ConfigError
from gradwatch.rules.bounded_yaml import MAX_YAML_BYTES, load_bounded
from gradwatch.spool.format import default_home

SECRET_SETTINGS = frozenset({"grafana_token"})  # never printed, not even in an error message
URL_SETTINGS = frozenset({"alertmanager_url", "webhook_url", "grafana_url"})  # printed redacted (agent/redact.py)
#: settings read from a file: the file's setting -> the setting it gives
SECRET_FILES = {"alertmanager_url_file": "alertmanager_url", "webhook_url_file": "webhook_url",
                "grafana_token_file": "grafana_token"}
MAX_SECRET_FILE_BYTES = 64 * 1024
DEFAULT_PORT = 9478  # not 9400: that is the DCGM exporter's default, and both run on GPU nodes
ENV_PREFIX = "GRADWATCH_"


class AgentConfig(BaseModel):
    """Settings of ``gradwatch agent``. Each has an environment twin ``GRADWATCH_<NAME>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(default_factory=default_home, description="spool directory shared with the probes")
    host: str = Field("127.0.0.1", min_length=1, description="address to serve /metrics on")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="port to serve /metrics on (0: any free port)")
    stall_after_seconds: float = Field(120.0, gt=0, description="a run with no record for this long is stalled")
    stuck_after_seconds: float = Field(
        30.0, gt=0, description="a records file ending mid-line this long while its process lives is reported stuck")
    ended_ttl_seconds: float = Field(900.0, ge=0, description="series of finished/crashed runs are dropped after this")
    rescan_interval_seconds: float = Field(
        5.0, gt=0, description="a look for runs and files the watcher missed (every 12th reads every run directory)")
    checkpoint_interval_seconds: float = Field(
        5.0, gt=0, description="how often offsets and state are saved (less often when a save takes over a tenth of it)")
    spike_window_seconds: float = Field(60.0, gt=0, description="window of the *_recent_max gauges")
    exit_when_idle_seconds: float | None = Field(None, gt=0, description="exit after this long with no running run")
    rules_file: Path | None = Field(None, description="YAML rules file, reloaded when it changes (default: packaged)")
    command_lead_seconds: float = Field(
        0.15, ge=0, description="multi-rank runs: a command is applied this far ahead, so every rank gets it in time")
    command_min_lead_steps: int = Field(2, ge=1, description="multi-rank runs: and at least this many steps ahead")
    gpu_collector: bool = Field(True, description="export this machine's GPUs through NVML, labelled with their runs")
    # -- alerts (docs/alerts.md) -------------------------------------------------------------------
    alertmanager_url: AnyHttpUrl | None = Field(
        None, description="Alertmanager to send step-resolution alerts to (its API v2), e.g. http://127.0.0.1:9093")
    webhook_url: AnyHttpUrl | None = Field(None, description="also POST every alert to this URL (JSON)")
    webhook_format: Literal["alertmanager", "slack"] = Field(
        "alertmanager", description="webhook payload: Alertmanager's webhook JSON, or a Slack-compatible message")
    alert_console: bool = Field(True, description="log every alert that fires or resolves")
    alert_resolve_after_seconds: float = Field(
        300.0, gt=0, description="an alert resolves once its condition has not been seen for this long")
    alert_retry_seconds: float = Field(
        600.0, gt=0, description="a delivery that fails is retried with backoff for this long, then dropped")
    alert_resend_seconds: float = Field(60.0, gt=0, description="firing alerts are re-sent to Alertmanager this often")
    grafana_url: AnyHttpUrl | None = Field(None, description="Grafana to post an annotation to for every action and "
                                                               "alert")
    grafana_token: SecretStr | None = Field(
        None, description="Grafana service-account token (set it in GRADWATCH_GRAFANA_TOKEN; never logged)")
    docs_url: AnyHttpUrl = Field(
        AnyHttpUrl(DEFAULT_DOCS_URL), description="where gradwatch's docs/ is published: each alert's runbook_url "
                                                  "links to its section of alerts.md there")
    dashboard_url: AnyHttpUrl | None = Field(
        None, description="Grafana as people open it, for each alert's dashboard_url (default: grafana_url "
                          "without credentials, else " + DEFAULT_GRAFANA_URL + ")")
    # -- secrets from files (as Prometheus and Alertmanager take them): nothing on the command line, which `ps`
    # shows every user of the machine ------------------------------------------------------------------
    alertmanager_url_file: Path | None = Field(
        None, description="read alertmanager_url from this file (a URL with basic-auth credentials)")
    webhook_url_file: Path | None = Field(None, description="read webhook_url from this file (its path is its secret)")
    grafana_token_file: Path | None = Field(None, description="read grafana_token from this file")

    def alert_links(self) -> AlertLinks:
        grafana = self.dashboard_url or self.grafana_url
        return AlertLinks(docs_url=str(self.docs_url).rstrip("/"),
                          grafana_url=without_credentials(str(grafana)).rstrip("/") if grafana else DEFAULT_GRAFANA_URL)


def _env_values(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    out = {}
    for name in AgentConfig.model_fields:
        var = ENV_PREFIX + name.upper()
        if var in env and env[var] != "":
            out[name] = (env[var], f"environment variable {var}")
    return out


def _file_values(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_YAML_BYTES + 1)
        data = load_bounded(text, f"config file {path}")  # capped in size, aliases bounded; errors name the file
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    agent_section = data.get("agent", data)
    if not isinstance(agent_section, dict):
        raise ConfigError(f"config file {path}: 'agent' must be a mapping of settings")
    return {str(k): (v, f"config file {path}, key {k}") for k, v in agent_section.items()}


def _read_secret_files(layered: dict[str, tuple[Any, str]]) -> None:
    """Replace each ``*_file`` setting by the setting it names, read from the file (stripped)."""
    for file_setting, setting in SECRET_FILES.items():
        if file_setting not in layered:
            continue
        raw, source = layered.pop(file_setting)
        if setting in layered:
            raise ConfigError(f"{setting} is given twice: {layered[setting][1]} and {file_setting} ({source}); "
                              "give one of them")
        path = Path(str(raw)).expanduser()
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_SECRET_FILE_BYTES + 1)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"cannot read {file_setting} {path} ({source}): {reason}") from None
        value = text.strip()
        if not value or len(text) > MAX_SECRET_FILE_BYTES:
            raise ConfigError(f"{file_setting} {path} ({source}) is empty or too large: it holds one value")
        layered[setting] = (value, f"{file_setting} {path}")


def load_agent_config(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    cli_flags: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Merge the sources and validate; raise ConfigError listing every problem with its source."""
    env = os.environ if env is None else env
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(env[ENV_PREFIX + "CONFIG"])
    layered: dict[str, tuple[Any, str]] = {}
    if config_file is not None:
        layered.update(_file_values(config_file))
    layered.update(_env_values(env))
    flags = cli_flags or {}
    layered.update({k: (v, f"option {flags.get(k, '--' + k.replace('_', '-'))}")
                    for k, v in (cli or {}).items() if v is not None})
    _read_secret_files(layered)
    try:
        config = AgentConfig(**{k: v for k, (v, _) in layered.items()})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            value, source = layered.get(field, (err.get("input"), "defaults"))
            if field in SECRET_SETTINGS:
                value = "<hidden>"
            elif field in URL_SETTINGS and isinstance(value, str):
                value = redact_url(value)
            if err["type"] == "extra_forbidden":
                known = ", ".join(AgentConfig.model_fields)
                problems.append(f"unknown setting {field!r} ({source}); known settings: {known}")
            else:
                problems.append(f"{field} = {value!r} ({source}): {err['msg']}")
        separator = " " if len(problems) == 1 else "\n  "
        raise ConfigError("invalid agent configuration:" + separator + separator.join(problems)) from None
    update: dict[str, Any] = {"home": config.home.expanduser().resolve()}
    if config.rules_file is not None:
        update["rules_file"] = config.rules_file.expanduser().resolve()
    return config.model_copy(update=update)
