"""The Grafana dashboards: generated and current, every query run against a real Prometheus
that scrapes a real agent serving a live run (the demo training: it diverges, is rewound,
skips a NaN batch, clips, and logs per-layer statistics). The agent's NVML is faked, so that
the GPU panels have series on a machine without a GPU; no Grafana server runs here, so the
queries are evaluated the way Grafana would send them (variables substituted)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml

from gradwatch.agent import catalogue
from gradwatch.dashboards import NAMES, load, load_all
from gradwatch.dashboards.generate import main as generate
from tests.conftest import http_json, wait_until

ROOT = Path(__file__).resolve().parents[2]
KNOWN = {spec.name for spec in catalogue.ALL}
PROMETHEUS_OWN = {"ALERTS"}  # the series Prometheus itself makes for its alert rules
#: Metrics a run on a CPU cannot have: the CUDA caching allocator's counters.
CPU_EMPTY = re.compile(r"gradwatch_cuda_memory_")


def test_committed_dashboards_are_what_the_generator_makes() -> None:
    assert generate(["--check"]) == 0, "run python -m gradwatch.dashboards.generate"


def _panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in model["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def queries(model: dict[str, Any]) -> Iterator[tuple[str, str, bool, bool]]:
    """(where, expr, instant, is_panel) for every panel target and every Prometheus annotation."""
    for panel in _panels(model):
        for target in panel.get("targets", []):
            yield f"{model['uid']} / {panel['title']} / {target['refId']}", target["expr"], target["instant"], True
    for annotation in model["annotations"]["list"]:
        if "expr" in annotation:
            yield f"{model['uid']} / annotation {annotation['name']}", annotation["expr"], False, False


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: every gradwatch_* name, and any name before a selector."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    names = set(re.findall(r"\bgradwatch_\w+", without_strings))
    for alternatives in re.findall(r'__name__=~?"([^"]*)"', expr):  # {__name__=~"a|b"}: both count
        names |= set(alternatives.split("|"))
    names |= set(re.findall(r"\b([A-Za-z_:][\w:]*)\{", without_strings))
    return names - {"by", "without", "on", "ignoring", "group_left", "group_right"}


def unknown_metrics(model: dict[str, Any]) -> list[str]:
    return [f"{where}: {name}" for where, expr, *_ in queries(model) for name in sorted(metric_names(expr))
            if name not in KNOWN | PROMETHEUS_OWN]


def test_dashboards_name_only_metrics_the_agent_exports() -> None:
    for name in NAMES:
        assert unknown_metrics(load(name)) == []


def test_a_dashboard_naming_a_metric_the_agent_lacks_fails() -> None:
    model = {"uid": "x", "panels": [{"title": "p", "targets": [
        {"refId": "A", "instant": False, "expr": 'rate(gradwatch_loss_total{run="$run"}[5m]) + DCGM_FI_DEV_GPU_UTIL{gpu="0"}'}]}],
        "annotations": {"list": []}}
    assert unknown_metrics(model) == ["x / p / A: DCGM_FI_DEV_GPU_UTIL", "x / p / A: gradwatch_loss_total"]


def test_a_metric_named_by_a_name_regex_is_checked_too() -> None:
    model = {"uid": "x", "panels": [{"title": "p", "targets": [
        {"refId": "A", "instant": True, "expr": 'sum(increase({__name__=~"gradwatch_spikes_total|gradwatch_nope"}[5m]))'}]}],
        "annotations": {"list": []}}
    assert unknown_metrics(model) == ["x / p / A: gradwatch_nope"]


def test_the_fleet_table_links_each_run_to_its_run_and_debug_dashboards() -> None:
    models = load_all()
    table = next(p for p in _panels(models["fleet"]) if p["type"] == "table")
    override = next(o for o in table["fieldConfig"]["overrides"] if o["matcher"]["options"] == "Run")
    links = next(p["value"] for p in override["properties"] if p["id"] == "links")
    targets = {}
    for link in links:
        match = re.fullmatch(r"/d/([\w-]+)\?(.*)", link["url"])
        assert match, link
        targets[match.group(1)] = match.group(2).split("&")
    assert set(targets) == {"gradwatch-run", "gradwatch-debug"}
    for uid, params in targets.items():
        # the clicked cell's run, and the data source, hosts and time range the fleet view had
        assert params == ["var-run=${__value.raw}", "${datasource:queryparam}", "${instance:queryparam}",
                          "${__url_time_range}"]
        dashboard = next(m for m in models.values() if m["uid"] == uid)
        assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "instance", "run"}


def test_every_query_is_filtered_by_the_host_variable() -> None:
    """One host picked in the Host variable: every panel shows that agent's series only (ALERTS included)."""
    for name, model in load_all().items():
        variables = {v["name"]: v for v in model["templating"]["list"]}
        host = variables["instance"]
        assert host["query"] == "label_values(gradwatch_run_info, instance)" and host["includeAll"], name
        if "run" in variables:
            assert 'instance=~"$instance"' in variables["run"]["query"], name
        for where, expr, *_ in queries(model):
            selectors = re.findall(r"\{[^{}]*\}", re.sub(r"\{\{\w+\}\}", "", expr))
            # range selectors [5m] and "by (run)" have no braces; every metric selector names the host
            assert selectors and all('instance=~"$instance"' in sel for sel in selectors), f"{where}: {expr}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with the Debian package prometheus")
def test_the_fleet_divergence_column_keeps_runs_that_have_only_one_of_the_counters(tmp_path: Path) -> None:
    """A run with spikes but no non-finite series (and one the other way round) still gets its count: "a + b"
    matched label for label would have dropped both (promtool evaluates the panel's own query)."""
    table = next(p for p in _panels(load_all()["fleet"]) if p["type"] == "table")
    expr = substitute(next(t["expr"] for t in table["targets"] if t["refId"] == "divergence"), "unused")
    base = 'job="gradwatch",instance="trainer-1:9478",rank="0"'
    tests = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": f'gradwatch_spikes_total{{{base},run="only-spikes",quantity="loss"}}', "values": "0 0 1 2"},
            {"series": f'gradwatch_nonfinite_total{{{base},run="only-nan",quantity="metric"}}', "values": "0 0 0 3"},
            {"series": f'gradwatch_spikes_total{{{base},run="both",quantity="loss"}}', "values": "0 0 0 1"},
            {"series": f'gradwatch_nonfinite_total{{{base},run="both",quantity="grad_norm"}}', "values": "0 1 1 1"},
            # the same quantity on both sides, and a run with neither
            {"series": f'gradwatch_nonfinite_total{{{base},run="both",quantity="loss"}}', "values": "0 0 0 0"},
            *({"series": f'gradwatch_run_state{{{base},run="{run}",state="running"}}', "values": "1 1 1 1"}
              for run in ("only-spikes", "only-nan", "both", "neither"))],
        "promql_expr_test": [{"expr": expr, "eval_time": "3m", "exp_samples": [
            {"labels": '{run="only-spikes"}', "value": 2}, {"labels": '{run="only-nan"}', "value": 3},
            {"labels": '{run="both"}', "value": 2}, {"labels": '{run="neither"}', "value": 0}]}]}]}
    path = tmp_path / "divergence.test.yml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_panel_has_units_a_description_and_a_place_on_a_laptop_screen() -> None:
    for name, model in load_all().items():
        for panel in _panels(model):
            if panel["type"] == "row":
                continue
            where = f"{name} / {panel['title']}"
            assert panel.get("description"), f"{where}: no description"
            assert panel["gridPos"]["w"] <= 24 and panel["gridPos"]["h"] <= 10, where
            if panel["type"] == "timeseries":
                assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
                assert all(t.get("legendFormat") for t in panel["targets"]), f"{where}: a series without a legend"


def substitute(expr: str, run: str) -> str:
    """What Grafana sends for the default variable values: one run, all ranks, top 10 layers."""
    return (expr.replace("$run", run).replace("$rank", ".*").replace("$instance", ".*").replace("$topk", "10")
            .replace("$__rate_interval", "1m").replace("$__interval", "5s"))


def _api(prom: Any, path: str, **params: Any) -> dict[str, Any]:
    body = http_json(f"{prom.url}/api/v1/{path}?{urlencode(params, doseq=True)}")
    assert body["status"] == "success", body
    return body["data"]


def variable_values(prom: Any, variable: dict[str, Any], run: str) -> list[str]:
    """A template variable's values as Grafana's Prometheus data source gets them."""
    if variable["type"] == "custom":
        return [v.strip() for v in variable["query"].split(",")]
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
    assert match, f"unsupported variable query {variable['query']!r}"
    selector, label = match.groups()
    return _api(prom, f"label/{label}/values", **{"match[]": substitute(selector, run)})


@pytest.mark.integration
def test_every_query_runs_and_returns_data_for_a_live_run(isolated_home: Path, agent_process, prometheus,
                                                          tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = agent_process(fake_gpus=True)
    prom = prometheus([f"127.0.0.1:{agent.port}"], rule_files=[ROOT / "alerts" / "gradwatch.rules.yml"])
    env = {"GRADWATCH_HOME": str(isolated_home), "GRADWATCH_LAYER_STATS_EVERY": "10", "GRADWATCH_AUTOSTART": "0"}
    demo = subprocess.Popen([sys.executable, "-m", "gradwatch", "demo", "--no-live", "--steps", "2000",
                             "--steps-per-second", "50"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # past the divergence: the rewind was applied and Prometheus has a minute of history to rate over
        wait_until(lambda: (prom.scalar('sum(gradwatch_actions_total{run="demo",action="rewind"})') or 0) >= 1,
                   timeout=120, what="the demo's rewind in Prometheus")
        wait_until(lambda: prom.scalar('count(gradwatch_layer_update_ratio{run="demo"})'), timeout=30,
                   what="layer statistics")
        time.sleep(3)
        assert demo.poll() is None, "the demo run should still be running while its dashboards are queried"
        assert prom.scalar('gradwatch_run_state{run="demo",state="running"}') == 1.0
        now = time.time()
        failures = []
        for name, model in load_all().items():
            for variable in model["templating"]["list"]:
                if variable["type"] in ("query", "custom"):
                    values = variable_values(prom, variable, "demo")
                    expected = {"run": "demo", "rank": "0", "topk": "10",
                                "instance": f"127.0.0.1:{agent.port}"}[variable["name"]]
                    if expected not in values:
                        failures.append(f"{name}: variable {variable['name']} = {values}, no {expected!r}")
            for where, expr, instant, is_panel in queries(model):
                promql = substitute(expr, "demo")
                if instant:
                    result = _api(prom, "query", query=promql, time=now)["result"]
                else:
                    result = _api(prom, "query_range", query=promql, start=now - 120, end=now, step=5)["result"]
                # annotations mark events, ALERTS depends on the rules' `for:` durations: both may be empty
                must_have_data = is_panel and not CPU_EMPTY.search(expr) and "ALERTS" not in expr
                if must_have_data and not result:
                    failures.append(f"{where}: no data for {promql}")
        assert failures == []
    finally:
        demo.kill()
        demo.wait()

