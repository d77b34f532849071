"""Alerts end to end with real servers: training processes -> agent -> Alertmanager -> webhook,
and the same runs scraped by a real Prometheus that evaluates alerts/gradwatch.rules.yml.

Everything is real: Debian's prometheus and prometheus-alertmanager on loopback ports, torch
training in subprocesses, the agent as a subprocess; the receiver is a local HTTP server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SUPPORT, AgentProcess, WebhookReceiver, free_port, http_json, metric, wait_until
from tests.spool_records import run_records

pytestmark = pytest.mark.integration
RULES_FILE = REPO / "alerts" / "gradwatch.rules.yml"


def start_training(home: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GRADWATCH_HOME": str(home)}
    return subprocess.Popen([sys.executable, str(SUPPORT / "rules_script.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()


def step_time(home: Path, run: str, step: int) -> float:
    """When the probe recorded ``step`` (the spool's own record of it)."""
    for record in run_records(home, run):
        if record["kind"] == "step" and record["step"] == step:
            return float(record["t"])
    raise AssertionError(f"step {step} not in the spool of {run}")


def alerts_for(receiver: WebhookReceiver, run: str, **labels: str) -> list[tuple[float, dict[str, Any]]]:
    return [(t, a) for t, a in receiver.alerts()
            if a["labels"].get("run") == run and all(a["labels"].get(k) == v for k, v in labels.items())]


def report(name: str, **figures: Any) -> None:
    """Print a measured figure (pytest -s shows it; docs/benchmarks.md records a run of them)."""
    print(f"\n[alert latency] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture
def stack(isolated_home: Path, agent_process: Any, alertmanager: Any, prometheus: Any,
          webhook_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("GRADWATCH_ALERT_RESOLVE_AFTER_SECONDS", "8")  # see alerts resolve within the test
    am = alertmanager(webhook_receiver.url)
    agent = agent_process("--alertmanager-url", am.url, "--stall-after", "30")
    prom = prometheus([agent.url.removeprefix("http://")], rule_files=[RULES_FILE],
                      alertmanagers=[am.url.removeprefix("http://")])
    return {"agent": agent, "am": am, "prom": prom, "receiver": webhook_receiver, "home": isolated_home}


def test_diverging_run_reaches_the_receiver_naming_the_run(stack: dict[str, Any]) -> None:
    home, receiver = stack["home"], stack["receiver"]
    jump_at = 120
    proc = start_training(home, "--run-name", "diverging", "--steps", "260", "--sleep", "0.02",
                          "--lr-jump-at", str(jump_at), "--lr-jump", "40")
    divergence = {"GradwatchLossSpike", "GradwatchGradNormExplosion", "GradwatchLossDivergence"}
    wait_until(lambda: [a for _, a in alerts_for(receiver, "diverging", source="agent")
                        if a["labels"]["alertname"] in divergence], timeout=120,
               what="the agent's divergence alert for the diverging run at the webhook")
    finish(proc)
    t_bad = step_time(home, "diverging", jump_at)
    received = alerts_for(receiver, "diverging", source="agent")
    t_any = min(t for t, _ in received)
    # the divergence detectors see it first; the loss may reach NaN a few steps later, and its alert then comes
    # with theirs, in the same delivery (Alertmanager's group_wait, 1 s here)
    t_first, first = min(((t, a) for t, a in received if a["labels"]["alertname"] in divergence),
                         key=lambda ta: ta[0])
    assert t_first - t_any <= 1.0, received
    assert first["labels"]["rank"] == "0" and first["labels"]["severity"] in {"warning", "critical"}
    assert "diverging" in first["annotations"]["summary"]  # a person reads which run
    assert first["annotations"]["hint"]
    report("diverging run, bad step -> webhook via agent + Alertmanager (group_wait 1s)",
           seconds=round(t_first - t_bad, 2), alert=first["labels"]["alertname"])
    # the loss then runs away to inf: a critical alert follows; once the detectors are quiet
    # (the run has finished) for alert_resolve_after_seconds, the alerts resolve
    critical = wait_until(lambda: alerts_for(receiver, "diverging", severity="critical"), timeout=60,
                          what="a critical alert for the diverging run")
    assert critical[0][1]["labels"]["alertname"] in {"GradwatchNonfiniteLoss", "GradwatchLossDivergence"}
    wait_until(lambda: [a for _, a in alerts_for(receiver, "diverging", source="agent") if a["status"] == "resolved"],
               timeout=60, what="the agent's alerts resolved")


def test_healthy_run_produces_no_notification(stack: dict[str, Any]) -> None:
    home, receiver, prom = stack["home"], stack["receiver"], stack["prom"]
    proc = start_training(home, "--run-name", "healthy", "--steps", "300", "--sleep", "0.01")
    finish(proc)
    # Prometheus has scraped the finished run and evaluated every rule over it several times
    wait_until(lambda: prom.scalar('gradwatch_run_state{run="healthy",state="finished"}') == 1.0, timeout=60,
               what="Prometheus sees the finished run")
    evaluated = time.monotonic()
    wait_until(lambda: time.monotonic() - evaluated > 5 and prom.query("ALERTS") == [], timeout=30,
               what="five more seconds of rule evaluation with no alert")
    assert receiver.received == []
    assert stack["am"].alerts() == []


def test_killed_training_raises_the_crashed_alert(stack: dict[str, Any]) -> None:
    home, receiver, agent = stack["home"], stack["receiver"], stack["agent"]
    proc = start_training(home, "--run-name", "killed", "--steps", "100000", "--sleep", "0.02")
    wait_until(lambda: (metric(agent.metrics(), "gradwatch_steps_total", optimizer="0", run="killed", rank="0") or 0) > 20,
               timeout=60, what="the run under way")
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    proc.communicate()
    agent_alert = wait_until(lambda: alerts_for(receiver, "killed", alertname="GradwatchRunCrashed", source="agent"),
                             timeout=60, what="the agent's crashed alert")
    prom_alert = wait_until(lambda: alerts_for(receiver, "killed", alertname="GradwatchRunCrashed",
                                               source="prometheus"), timeout=60, what="Prometheus' crashed alert")
    t_agent, a = agent_alert[0]
    assert a["labels"]["severity"] == "critical" and a["status"] == "firing"
    assert "killed" in a["annotations"]["summary"]
    report("SIGKILL -> crashed alert at the webhook", agent_seconds=round(t_agent - killed_at, 2),
           prometheus_seconds=round(prom_alert[0][0] - killed_at, 2))


def test_alert_arrives_after_alertmanager_comes_back(isolated_home: Path, agent_process: Any, alertmanager: Any,
                                                    webhook_receiver: WebhookReceiver) -> None:
    am_port = free_port()  # nothing listens here yet
    agent: AgentProcess = agent_process("--alertmanager-url", f"http://127.0.0.1:{am_port}")
    proc = start_training(isolated_home, "--run-name", "nan-run", "--steps", "150", "--nan-at", "60")
    finish(proc)
    wait_until(lambda: (metric(agent.metrics(), "gradwatch_agent_notification_failures_total",
                               endpoint="alertmanager") or 0) >= 2,
               timeout=60, what="the agent retrying the unreachable Alertmanager")
    assert metric(agent.metrics(), "gradwatch_agent_notifications_pending", endpoint="alertmanager") >= 1
    started = time.time()
    alertmanager(webhook_receiver.url, port=am_port)
    got = wait_until(lambda: alerts_for(webhook_receiver, "nan-run", alertname="GradwatchNonfiniteLoss"),
                     timeout=60, what="the NaN alert after Alertmanager came back")
    assert got[0][1]["status"] == "firing"
    samples = agent.metrics()
    assert metric(samples, "gradwatch_agent_notifications_total", endpoint="alertmanager", result="delivered") >= 1
    assert metric(samples, "gradwatch_agent_notifications_total", endpoint="alertmanager", result="expired") == 0
    report("Alertmanager down, then up -> alert delivered", seconds_after_restart=round(got[0][0] - started, 2))


def test_an_interrupted_run_pages_nobody_and_a_failed_one_warns(stack: dict[str, Any]) -> None:
    """Ctrl-C and SIGTERM (a scheduler preempting the job) end a run as interrupted, with no crash page from the
    agent or from Prometheus; a script that exits with status 3 is failed (a warning), and a crash stays critical."""
    home, receiver, agent = stack["home"], stack["receiver"], stack["agent"]
    ctrl_c = start_training(home, "--run-name", "ctrl-c", "--steps", "400", "--sleep", "0.01", "--ctrl-c-at", "30")
    exits = start_training(home, "--run-name", "exit-3", "--steps", "400", "--sleep", "0.01", "--exit-at", "30")
    raises = start_training(home, "--run-name", "raises", "--steps", "400", "--sleep", "0.01", "--raise-at", "30")
    preempted = start_training(home, "--run-name", "sigterm", "--steps", "100000", "--sleep", "0.02")
    wait_until(lambda: (metric(agent.metrics(), "gradwatch_steps_total", optimizer="0", run="sigterm", rank="0") or 0)
               > 20, timeout=60, what="the run under way")
    preempted.send_signal(signal.SIGTERM)
    assert preempted.wait(timeout=60) == -signal.SIGTERM  # still ended by the signal, as without gradwatch
    assert ctrl_c.wait(timeout=120) == -signal.SIGINT and exits.wait(timeout=120) == 3 and raises.wait(120) == 1
    states = {run: state for run in ("ctrl-c", "exit-3", "sigterm", "raises")
              for state in ("interrupted", "failed", "finished", "crashed")
              if wait_until(lambda run=run: metric(agent.metrics(), "gradwatch_run_state", run=run, rank="0",
                                                    state="running") == 0, timeout=60, what=f"{run} ended")
              and metric(agent.metrics(), "gradwatch_run_state", run=run, rank="0", state=state) == 1}
    assert states == {"ctrl-c": "interrupted", "exit-3": "failed", "sigterm": "interrupted", "raises": "crashed"}
    failed = wait_until(lambda: alerts_for(receiver, "exit-3", alertname="GradwatchRunFailed", source="agent"),
                        timeout=60, what="the agent's failed alert")
    assert failed[0][1]["labels"]["severity"] == "warning" and "status 3" in failed[0][1]["annotations"]["summary"]
    wait_until(lambda: alerts_for(receiver, "exit-3", alertname="GradwatchRunFailed", source="prometheus"),
               timeout=60, what="Prometheus' failed alert")
    evaluated = time.monotonic()
    wait_until(lambda: time.monotonic() - evaluated > 5, timeout=30)  # a few more rule evaluations and deliveries
    for run in ("ctrl-c", "sigterm"):
        assert alerts_for(receiver, run) == [], f"{run} paged someone"
    crashed = wait_until(lambda: alerts_for(receiver, "raises", alertname="GradwatchRunCrashed", source="agent"),
                         timeout=60, what="the crash alert")
    assert crashed[0][1]["labels"]["severity"] == "critical"  # a crash is still a crash
    assert {a["labels"]["run"] for _, a in receiver.alerts() if a["labels"]["alertname"] == "GradwatchRunCrashed"} \
        == {"raises"}


STOP_ON_NAN = """
rules:
  - name: nan-stop
    metric: loss
    detect: {type: nonfinite}
    action: {type: stop}
    mode: act
    alert: critical
"""


def test_a_freshly_started_agent_records_runs_that_ended_before_it_as_history(
        isolated_home: Path, tmp_path: Path, agent_process: Any, alertmanager: Any,
        webhook_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs that hit a NaN with no agent watching: one ended an hour ago, one just now. The agent that starts
    afterwards decides on both, but sends no command and pages nobody for the old one; the one that just ended
    still reaches a person (it may have started the agent itself)."""
    from gradwatch.spool.format import SpoolLayout

    rules = tmp_path / "rules.yaml"
    rules.write_text(STOP_ON_NAN)
    for run in ("yesterday", "just-now"):
        finish(start_training(isolated_home, "--run-name", run, "--steps", "60", "--nan-at", "30",
                              "--rules", str(rules)))
    hour_ago = time.time() - 3600
    for path in SpoolLayout(isolated_home).run_dir("yesterday").iterdir():
        os.utime(path, (hour_ago, hour_ago))
    monkeypatch.setenv("GRADWATCH_ALERT_RESOLVE_AFTER_SECONDS", "3600")  # the NaN's trigger still stands
    am = alertmanager(webhook_receiver.url)
    agent = agent_process("--alertmanager-url", am.url)
    wait_until(lambda: alerts_for(webhook_receiver, "just-now", alertname="GradwatchNanStop"), timeout=60,
               what="the NaN alert of the run that just ended")
    for run in ("yesterday", "just-now"):
        wait_until(lambda run=run: metric(agent.metrics(), "gradwatch_run_state", run=run, rank="0",
                                          state="finished") == 1, timeout=60, what=f"{run} read")
    layout = SpoolLayout(isolated_home)
    events = [json.loads(line) for line in SpoolLayout.events_file(layout.run_dir("yesterday")).read_text().splitlines()]
    decided = [e for e in events if e["event"] == "decision"]
    assert [(d["rule"], d["step"], d["history"], d["sent"]) for d in decided] == [("nan-stop", 30, True, False)]
    assert not SpoolLayout.commands_file(layout.run_dir("yesterday")).exists() or \
        SpoolLayout.commands_file(layout.run_dir("yesterday")).read_text() == ""
    time.sleep(3)  # deliveries of anything else the agent had
    assert alerts_for(webhook_receiver, "yesterday") == []
    assert [a["run"] for a in http_json(agent.url + "/api/runs")["runs"] if a["alerts"]] == ["just-now"]
