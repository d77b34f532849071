"""Alerts end to end with real servers: training processes -> agent -> Alertmanager -> webhook,
and the same runs scraped by a real Prometheus that evaluates alerts/gradwatch.rules.yml.

Everything is real: Debian's prometheus and prometheus-alertmanager on loopback ports, torch
training in subprocesses, the agent as a subprocess; the receiver is a local HTTP server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SUPPORT, AgentProcess, WebhookReceiver, free_port, metric, wait_until
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
    wait_until(lambda: alerts_for(receiver, "diverging", source="agent"), timeout=120,
               what="the agent's alert for the diverging run at the webhook")
    finish(proc)
    t_bad = step_time(home, "diverging", jump_at)
    t_first, first = min(alerts_for(receiver, "diverging", source="agent"), key=lambda ta: ta[0])
    assert first["labels"]["alertname"] in {"GradwatchLossSpike", "GradwatchGradNormExplosion",
                                            "GradwatchLossDivergence"}
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
