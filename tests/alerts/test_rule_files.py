"""The shipped alert files: valid for Prometheus and Alertmanager, unit-tested, generated, documented."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradwatch.agent.catalogue import ALL
from gradwatch.agent.links import CATALOGUE_ALERTS, DEFAULT_DOCS_URL, DEFAULT_GRAFANA_URL, RUNBOOK_ALERTS, alert_name, anchor
from gradwatch.rules.config import default_rules
from tests.conftest import REPO

ALERTS = REPO / "alerts"
GROUPS = yaml.safe_load((ALERTS / "gradwatch.rules.yml").read_text())["groups"]
RULES = [rule for group in GROUPS for rule in group["rules"] if "alert" in rule]
RECORDED = [rule for group in GROUPS for rule in group["rules"] if "record" in rule]
TESTS = yaml.safe_load((ALERTS / "tests" / "gradwatch.rules.test.yml").read_text())["tests"]
DOC = (REPO / "docs" / "alerts.md").read_text()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; scripts/test.sh installs the Debian packages prometheus and "
                    f"prometheus-alertmanager")
    return path


def _run(*cmd: str, cwd: object = REPO) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_generated_files_are_up_to_date() -> None:
    _run(sys.executable, "alerts/generate.py", "--check")


def test_promtool_checks_the_rules() -> None:
    found = f"SUCCESS: {len(RULES) + len(RECORDED)} rules found"  # the alerts and the recording rules they read
    assert len(RECORDED) == 1 and found in _run(_tool("promtool"), "check", "rules", "alerts/gradwatch.rules.yml")


def test_promtool_unit_tests_pass() -> None:
    assert "SUCCESS" in _run(_tool("promtool"), "test", "rules", "gradwatch.rules.test.yml", cwd=ALERTS / "tests")


def test_a_broken_expectation_fails_the_unit_tests(tmp_path: object) -> None:
    """The unit tests compare labels and annotations exactly: a wrong one must fail."""
    text = (ALERTS / "tests" / "gradwatch.rules.test.yml").read_text().replace("host trainer-1", "host trainer-2", 1)
    broken = ALERTS / "tests" / "broken.test.yml"
    broken.write_text(text)
    try:
        proc = subprocess.run([_tool("promtool"), "test", "rules", broken.name], cwd=broken.parent,
                              capture_output=True, text=True, timeout=120)
    finally:
        broken.unlink()
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr


def test_amtool_checks_the_example_alertmanager_config() -> None:
    out = _run(_tool("amtool"), "check-config", "alerts/alertmanager.yml")
    assert "SUCCESS" in out and "3 receivers" in out


def test_every_alert_has_a_firing_and_a_quiet_test() -> None:
    for rule in RULES:
        cases = [c for t in TESTS for c in t["alert_rule_test"] if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in cases), f"{rule['alert']}: no series that fires it"
        assert any(not c["exp_alerts"] for c in cases), f"{rule['alert']}: no series that must not fire it"


def test_every_alert_says_who_how_bad_and_what_to_check() -> None:
    for rule in RULES:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["labels"]["source"] == "prometheus"
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"] and ann["hint"], rule["alert"]
        names_the_run = "$labels.run" in ann["summary"] and "$labels.rank" in ann["summary"] and (
            '"host"' in ann["description"] or "$labels.host" in ann["description"])
        names_the_place = "$labels.instance" in ann["summary"]
        assert names_the_run or names_the_place, f"{rule['alert']} names neither the run nor where it is"


def test_the_issues_alerts_are_all_there() -> None:
    names = {rule["alert"] for rule in RULES}
    assert {"GradwatchNonfiniteLoss", "GradwatchLossSpike", "GradwatchGradNormExplosion", "GradwatchLossDivergence",
            "GradwatchRunStalled", "GradwatchRunCrashed", "GradwatchThroughputDropped", "GradwatchGPUUnderutilised",
            "GradwatchGPUMemoryNearFull", "GradwatchAgentDown"} <= names


def test_rules_use_only_metrics_the_agent_exports() -> None:
    exported = {spec.name for spec in ALL}
    for rule in RULES:
        for name in re.findall(r"\bgradwatch_[a-z_]+", rule["expr"]):
            assert name in exported, f"{rule['alert']} reads {name}, which the agent does not export"


def test_the_agents_alerts_share_names_with_the_prometheus_alerts_for_the_same_thing() -> None:
    prometheus = {rule["alert"] for rule in RULES}
    for name in ("nonfinite-loss", "loss-spike", "grad-norm-explosion", "loss-divergence"):
        assert alert_name(name) in prometheus


def test_docs_list_every_alert() -> None:
    agent_alerts = {alert_name(r.name) for r in default_rules().rules if r.alert != "none"}
    for name in {rule["alert"] for rule in RULES} | agent_alerts | {"GradwatchRunStalled", "GradwatchRunCrashed"}:
        assert f"`{name}`" in DOC or f"`{name}` (rule" in DOC, f"docs/alerts.md does not explain {name}"


def _runbook_headings() -> set[str]:
    section = DOC[DOC.index("<!-- runbooks:start -->"):DOC.index("<!-- runbooks:end -->")]
    return set(re.findall(r"^### `(\w+)`$", section, re.MULTILINE))


def test_every_alert_either_source_sends_has_a_runbook_section_and_nothing_else_does() -> None:
    """Also the catalogue's rules the defaults record without an alert (exploding_tensor, stalled_training,
    step_outlier): a user who gives one a severity gets its section."""
    agent_alerts = {alert_name(r.name) for r in default_rules().rules if r.alert != "none"}
    state_alerts = {"GradwatchRunStalled", "GradwatchRunCrashed", "GradwatchRunFailed"}
    sent = {rule["alert"] for rule in RULES} | agent_alerts | state_alerts
    assert _runbook_headings() == sent | CATALOGUE_ALERTS == RUNBOOK_ALERTS
    silent = {alert_name(r.name) for r in default_rules().rules if r.alert == "none"}
    assert CATALOGUE_ALERTS - sent == silent == {
        "GradwatchExplodingTensor", "GradwatchStalledTraining", "GradwatchStepOutlier"}


def test_every_rule_links_its_runbook_section_and_its_runs_dashboard() -> None:
    headings = {anchor(name) for name in _runbook_headings()}
    for rule in RULES:
        ann = rule["annotations"]
        base, _, fragment = ann["runbook_url"].partition("#")
        assert base == f"{DEFAULT_DOCS_URL}/alerts.md" and fragment == anchor(rule["alert"]) in headings
        if "$labels.run" in ann["summary"]:
            assert ann["dashboard_url"] == (f"{DEFAULT_GRAFANA_URL}/d/gradwatch-run?var-run={{{{ $labels.run | "
                                            "urlquery }}&var-rank={{ $labels.rank | urlquery }}"), rule["alert"]
        else:  # about an agent: its host's fleet view
            assert ann["dashboard_url"] == (f"{DEFAULT_GRAFANA_URL}/d/gradwatch-fleet?var-instance="
                                            "{{ $labels.instance | urlquery }}"), rule["alert"]
    # promtool's unit tests expect the rendered links (a run name escaped for a query string, the instance too)
    expected = [a["exp_annotations"] for t in TESTS for check in t["alert_rule_test"] for a in check["exp_alerts"]]
    assert all(e["runbook_url"] and e["dashboard_url"] for e in expected)
    assert any(e["dashboard_url"].endswith("var-instance=trainer-1%3A9478") for e in expected)


def test_a_site_writes_the_rules_with_its_own_links(tmp_path: Path) -> None:
    out = tmp_path / "site.rules.yml"
    _run(sys.executable, "alerts/generate.py", "--docs-url", "https://docs.example.com/gw/", "--grafana-url",
         "https://grafana.example.com", "-o", str(out))
    rules = [r for g in yaml.safe_load(out.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert [r["alert"] for r in rules] == [r["alert"] for r in RULES]
    spike = next(r for r in rules if r["alert"] == "GradwatchLossSpike")["annotations"]
    assert spike["runbook_url"] == "https://docs.example.com/gw/alerts.md#gradwatchlossspike"
    assert spike["dashboard_url"].startswith("https://grafana.example.com/d/gradwatch-run?var-run={{ $labels.run")
    _run(_tool("promtool"), "check", "rules", str(out))
    proc = subprocess.run([sys.executable, "alerts/generate.py", "--docs-url", "https://x"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "give its path with -o" in proc.stderr
