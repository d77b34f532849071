"""The docker-compose stack, validated as far as a machine without a Docker engine allows:
the compose file against the Compose Specification's JSON schema, Prometheus's and
Alertmanager's configurations with their own checkers (promtool, amtool), Grafana's
provisioning files against what Grafana reads, and the Dockerfiles against the tree.
Nothing here starts a container: CI machines have no Docker engine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gradwatch.agent.settings import DEFAULT_PORT
from gradwatch.dashboards import NAMES

ROOT = Path(__file__).resolve().parents[2]
#: The Compose Specification's schema, as shipped in docker-compose 1.29.2 (compose/config/compose_spec.json).
SCHEMA = Path(__file__).with_name("compose-spec.schema.json")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts (named volumes are left out)."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out.append((ROOT / source, target))
    return out


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft201909Validator(schema).validate(compose)
    assert set(compose["services"]) == {"trainer", "agent", "prometheus", "alertmanager", "grafana"}


def test_a_broken_compose_file_fails_the_schema() -> None:
    """The schema check can fail: a misspelt key is caught."""
    schema = json.loads(SCHEMA.read_text())
    with pytest.raises(jsonschema.ValidationError, match="portz"):
        jsonschema.Draft201909Validator(schema).validate({"services": {"agent": {"image": "x", "portz": ["1:1"]}}})


def test_every_port_is_bound_to_localhost_and_the_agent_keeps_its_port(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} would listen on every interface"
    assert compose["services"]["agent"]["ports"] == [f"127.0.0.1:{DEFAULT_PORT}:{DEFAULT_PORT}"]
    assert DEFAULT_PORT != 9400  # the DCGM exporter's port


def test_every_bind_mount_exists_in_the_repository(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for source, _ in _bind_mounts(service):
            assert source.exists(), f"{name} mounts {source}, which is missing"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with the Debian package prometheus")
def test_prometheus_config_passes_promtool_as_mounted(compose: dict[str, Any], tmp_path: Path) -> None:
    """Rebuild the container's /etc/prometheus from the compose mounts, then check it there, so that
    the rule file path in the config is checked too."""
    etc = tmp_path / "etc" / "prometheus"
    for source, target in _bind_mounts(compose["services"]["prometheus"]):
        if target.startswith("/etc/prometheus/"):
            dest = etc / target.removeprefix("/etc/prometheus/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, dest)
    config = yaml.safe_load((etc / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == [f"agent:{DEFAULT_PORT}"]
    result = subprocess.run(["promtool", "check", "config", str(etc / "prometheus.yml")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (etc / "alerts" / "gradwatch.rules.yml").read_text()
    rules = text.count("- alert:") + text.count("- record:")
    assert f"SUCCESS: {rules} rules found" in result.stdout  # the alert and recording rules were found and loaded


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool comes with the Debian package prometheus-alertmanager")
def test_alertmanager_config_passes_amtool(compose: dict[str, Any]) -> None:
    (source, target), = _bind_mounts(compose["services"]["alertmanager"])
    assert f"--config.file={target}" in compose["services"]["alertmanager"]["command"]
    result = subprocess.run(["amtool", "check-config", str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_is_what_grafana_reads(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {target: source for source, target in _bind_mounts(grafana)}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] in ("proxy", "direct") and ds["isDefault"] is True
    prometheus_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert ds["url"] == f"http://prometheus:{prometheus_port}"
    assert re.fullmatch(r"\d+s", ds["jsonData"]["timeInterval"])

    providers = yaml.safe_load((provisioning / "dashboards" / "gradwatch.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and set(provider) <= {
        "name", "orgId", "folder", "folderUid", "type", "disableDeletion", "editable", "allowUiUpdates",
        "updateIntervalSeconds", "options"}
    served = mounts[provider["options"]["path"]]  # the provider reads the directory the dashboards are mounted at
    assert served == ROOT / "dashboards"
    for name in NAMES:
        model = json.loads((served / f"{name}.json").read_text())
        assert model["uid"] == f"gradwatch-{name}" and model["title"] and "id" not in model
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (served / Path(home).relative_to(provider["options"]["path"])).is_file()


def test_the_dockerfiles_copy_what_exists_and_the_agent_image_has_no_torch(compose: dict[str, Any]) -> None:
    for name in ("agent", "trainer"):
        build = compose["services"][name]["build"]
        dockerfile = ROOT / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        text = dockerfile.read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} is missing"
        packages = {p.split("/")[-1] for p in re.findall(r'"gradwatch\.\w+" = "(\w+)"', (ROOT / "pyproject.toml").read_text())}
        copied = set(re.findall(r"^COPY (\w+) ", text, re.MULTILINE))
        assert packages <= copied, f"{dockerfile.name} misses packages {packages - copied}"
        if name == "agent":
            assert "torch" not in text.replace("without torch", "")
        else:
            assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
