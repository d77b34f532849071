"""Process-level behaviour: the agent without torch, the embedded default, crashed and stalled runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, http_get, http_json, metric, parse_metrics, run_training, wait_until

pytestmark = pytest.mark.integration

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def test_the_agent_runs_without_torch(isolated_home: Path, tmp_path: Path) -> None:
    from tests.agent.helpers import SpoolBuilder

    spool = SpoolBuilder(isolated_home)
    spool.start("no-torch")
    spool.steps("no-torch", 0, 1, 4, loss=0.5)
    port = free_port()
    code = BLOCK_TORCH + (f"from gradwatch.cli import main\nmain(['agent', '--home', {str(isolated_home)!r}, "
                          f"'--port', '{port}'])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # The endpoint answers before the first scan has ingested the spool: wait for the run, not the server.
        samples = wait_until(
            lambda: (s := parse_metrics(http_get(f"http://127.0.0.1:{port}/metrics").decode()))
            and metric(s, "gradwatch_steps_total", optimizer="0", run="no-torch", rank="0") == 4 and s,
            timeout=30, what="the agent to ingest the no-torch run")
        assert metric(samples, "gradwatch_loss", optimizer="0", run="no-torch", rank="0") == 0.5
        status = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "from gradwatch.cli import main\nmain(['status'])"],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "no-torch" in status.stdout, status.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_attach_starts_an_agent_when_none_runs(isolated_home: Path) -> None:
    port = free_port()
    env = {"GRADWATCH_AUTOSTART": "1", "GRADWATCH_PORT": str(port)}
    run_training(isolated_home, "--run", "auto", "--steps", "20", env=env)
    info = wait_until(lambda: json.loads((isolated_home / "agent" / "agent.json").read_text()), timeout=30,
                      what="the spawned agent")
    try:
        assert info["url"] == f"http://127.0.0.1:{port}"
        samples = wait_until(
            lambda: (s := parse_metrics(http_get(info["url"] + "/metrics").decode()))
            and metric(s, "gradwatch_steps_total", optimizer="0", run="auto", rank="0") == 20 and s, timeout=30)
        assert metric(samples, "gradwatch_run_state", run="auto", rank="0", state="finished") == 1.0
        run_training(isolated_home, "--run", "auto", "--steps", "5", env=env)  # the running agent is reused
        assert json.loads((isolated_home / "agent" / "agent.json").read_text())["pid"] == info["pid"]
    finally:
        os.kill(info["pid"], signal.SIGTERM)
        wait_until(lambda: not (isolated_home / "agent" / "agent.json").exists(), timeout=30, what="agent exit")


def test_a_killed_training_process_is_crashed_and_a_hung_one_stalled(isolated_home: Path, agent_process) -> None:  # type: ignore[no-untyped-def]
    agent = agent_process("--stall-after", "2")
    killed = run_training(isolated_home, "--run", "killed", "--steps", "100000", "--sleep", "0.01", wait=False)
    hung = run_training(isolated_home, "--run", "hung", "--steps", "100", "--hang-at", "10", wait=False)
    try:
        wait_until(lambda: (metric(agent.metrics(), "gradwatch_steps_total", optimizer="0", run="killed", rank="0") or 0) > 5,
                   timeout=120, what="the run to start")
        killed.kill()
        killed.wait()
        runs = wait_until(
            lambda: {r["run"]: r["status"] for r in http_json(agent.url + "/api/runs")["runs"]}
            if {r["run"]: r["status"] for r in http_json(agent.url + "/api/runs")["runs"]}
            == {"killed": "crashed", "hung": "stalled"} else None,
            timeout=60, what="crashed and stalled states")
        assert runs
        samples = agent.metrics()
        assert metric(samples, "gradwatch_run_state", run="killed", rank="0", state="crashed") == 1.0
        assert metric(samples, "gradwatch_run_state", run="hung", rank="0", state="stalled") == 1.0
    finally:
        for proc in (killed, hung):
            proc.kill()
            proc.wait()
