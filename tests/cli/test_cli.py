"""The command line: help that reads well, a status table, user errors as one line, the demo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.helpers import SpoolBuilder
from tests.conftest import free_port, wait_until


def gradwatch(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_help_lists_the_commands_and_how_to_start() -> None:
    result = gradwatch("--help")
    assert result.returncode == 0
    for text in ("gradwatch.attach(model, optimizer)", "agent", "status", "demo"):
        assert text in result.stdout
    agent_help = gradwatch("agent", "--help").stdout
    assert "GRADWATCH_PORT" in agent_help and "9478" in agent_help and "GRADWATCH_HOME" in agent_help


def test_numeric_options_show_as_numbers_in_help_and_a_wrong_one_is_one_line() -> None:
    help_text = gradwatch("agent", "--help").stdout
    for option, kind in (("--port", "INTEGER RANGE"), ("--stall-after", "SECONDS"), ("--ended-ttl", "SECONDS"),
                         ("--exit-when-idle", "SECONDS")):
        assert f"{option} {kind}" in help_text, option
    assert "TEXT" not in help_text.split("--home")[1].split("--alertmanager-url")[0]
    wrong = gradwatch("agent", "--stall-after", "soon")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr and "'soon' is not a valid float" in wrong.stderr


def test_status_shows_a_table_of_runs_from_the_spool_when_no_agent_runs(isolated_home: Path) -> None:
    spool = SpoolBuilder(isolated_home)
    spool.start("table-run")
    spool.steps("table-run", 0, 1, 12, loss=0.123)
    spool.end("table-run", 0, 12)
    result = gradwatch("status")
    assert result.returncode == 0, result.stderr
    assert "no agent running" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "table-run" in line)
    assert "finished" in row and " 12 " in row and "0.123" in row and "100.0 ms" in row
    as_json = json.loads(gradwatch("status", "--json").stdout)
    assert as_json["runs"][0]["ranks"][0]["steps"] == 12


def test_status_with_no_runs_says_how_to_add_one() -> None:
    result = gradwatch("status")
    assert result.returncode == 0 and "gradwatch.attach(model, optimizer)" in result.stdout


@pytest.mark.parametrize("args, env, message", [
    (["agent"], {"GRADWATCH_PORT": "nine"}, "port = 'nine' (environment variable GRADWATCH_PORT)"),
    (["agent", "--stall-after", "-1"], {}, "stall_after_seconds = -1.0 (option --stall-after)"),
    (["status", "--url", "http://127.0.0.1:9"], {}, "no gradwatch agent answers at http://127.0.0.1:9"),
    (["demo", "--steps", "3"], {}, "Invalid value for '--steps'"),
    (["agent", "--port", "0", "--rules", "/nonexistent/rules.yaml"], {},
     "cannot read rules file /nonexistent/rules.yaml"),
    (["agent", "--port", "0"], {"GRADWATCH_RULES_FILE": "/nonexistent/r.yaml"}, "cannot read rules file /nonexistent"),
])
def test_user_errors_are_one_clear_line_without_traceback(args: list[str], env: dict[str, str], message: str) -> None:
    result = gradwatch(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_agent_on_the_same_spool_is_refused_in_one_line(isolated_home: Path, agent_process) -> None:  # type: ignore[no-untyped-def]
    first = agent_process()
    result = gradwatch("agent", "--port", str(free_port()))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"another gradwatch agent already serves {isolated_home}" in result.stderr and first.url in result.stderr
    quiet = gradwatch("agent", "--port", str(free_port()), "--if-not-running")
    assert quiet.returncode == 0


@pytest.mark.integration
def test_demo_diverges_and_gradwatch_rewinds_cuts_the_lr_and_skips_the_nan_batch(isolated_home: Path) -> None:
    """With its port taken, the agent the demo starts listens on a free one and the demo says so; with
    stdout not a terminal (and no --no-live) the demo prints progress lines."""
    port = free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen()
    try:
        # paced as a training run is: flat out, 200 steps can end before the agent's LR cut reaches them when the
        # machine is loaded (the cut was decided, alerted, and never applied)
        result = gradwatch("demo", "--steps", "200", "--steps-per-second", "40",
                           env={"GRADWATCH_AUTOSTART": "1", "GRADWATCH_PORT": str(port)}, timeout=300)
    finally:
        taken.close()
    try:
        assert result.returncode == 0, result.stderr
        out = result.stdout
        url = json.loads((isolated_home / "agent" / "agent.json").read_text())["url"]
        assert not url.endswith(f":{port}") and f"{url}/metrics" in out
        assert f"Port {port} was taken" in out
        assert "step    40/200" in out  # progress lines, not a live panel
        assert "what the agent exported" in out
        row = next(line for line in out.splitlines() if line.startswith("│ demo") or (" demo " in line and "finished" in line))
        assert "finished" in row and "200" in row
        spikes = next(line for line in out.splitlines() if line.startswith("Spikes detected"))
        assert "loss 0," not in spikes  # the unstable phase was caught at step resolution
        did = out.split("What gradwatch did:")[1].split("Next:")[0]
        assert "skip_step  nonfinite" in did  # the NaN batch at 25 %
        assert "rewind     spike" in did and "restored the snapshot of step 50" in did  # the 80x jump at 45 %
        # the LR in effect before (the jump's 0.8) and after (the rewind restored 0.01, the cut halved it)
        assert "reduce_lr  spike" in did and "lr 0.8->0.005" in did
        assert "skipping the next 20 updates; lr 0.8->0.005" in did
        alerts = out.split("Alerts firing")[1].split("Next:")[0]
        assert "GradwatchRewindOnSpike: Run demo: loss spiked" in alerts  # and a person would have been told
    finally:
        info = json.loads((isolated_home / "agent" / "agent.json").read_text())
        os.kill(info["pid"], signal.SIGTERM)
        wait_until(lambda: not (isolated_home / "agent" / "agent.json").exists(), timeout=30, what="agent exit")


def test_rules_check_warns_about_a_metric_nothing_records(isolated_home: Path, tmp_path: Path) -> None:
    from tests.agent.helpers import SpoolBuilder

    spool = SpoolBuilder(isolated_home)  # a run that logged val_score
    spool.start("r")
    spool.steps("r", 0, 1, 3)
    spool.append("r", 0, {"kind": "log", "step": 3, "t": 1_000_001.0, "values": {"val_score": 0.5}})
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n"
                     "  - {name: typo, metric: val_los, detect: {type: early_stopping}, action: {type: stop}}\n"
                     "  - {name: logged, metric: val_score, detect: {type: early_stopping}, action: {type: stop}}\n"
                     "  - {name: built-in, metric: grad_norm, detect: {type: spike}, action: {type: stop}}\n"
                     "  - {name: conventional, metric: val_loss, detect: {type: plateau}, action: {type: stop}}\n")
    result = gradwatch("rules", "check", str(rules))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stdout
    assert "rule typo watches metric 'val_los'" in warnings[0] and "Did you mean 'val_loss'?" in warnings[0]


def test_the_demo_refuses_to_run_without_an_agent(isolated_home: Path) -> None:
    result = gradwatch("demo", "--steps", "200", "--steps-per-second", "0", env={"GRADWATCH_AUTOSTART": "0"},
                       timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the demo needs a running agent" in result.stderr and "GRADWATCH_AUTOSTART is off" in result.stderr
    assert "step " not in result.stdout  # it did not train on as if rules were acting


def test_status_tells_interrupted_failed_and_resumed_runs_apart(isolated_home: Path) -> None:
    spool = SpoolBuilder(isolated_home)
    for run in ("preempted", "gave-up", "resumed"):
        spool.start(run)
        spool.steps(run, 0, 1, 5)
    spool.append("preempted", 0, {"kind": "end", "step": 5, "t": 1_000_100.0, "status": "interrupted",
                                  "error": "SIGTERM"})
    spool.append("gave-up", 0, {"kind": "end", "step": 5, "t": 1_000_100.0, "status": "failed",
                                "error": "exited with status 3", "exit_code": 3})
    spool.append("resumed", 0, {"kind": "end", "step": 5, "t": 1_000_100.0, "status": "interrupted"},
                 {"kind": "resume", "step": 3, "t": 1_000_200.0, "checkpoint": ""})
    spool.steps("resumed", 0, 4, 9, t0=1_000_200.0)
    spool.end("resumed", 0, 9, t=1_000_300.0)
    result = gradwatch("status")
    assert result.returncode == 0, result.stderr
    rows = {run: next(line for line in result.stdout.splitlines() if f" {run} " in f" {line} ")
            for run in ("preempted", "gave-up", "resumed")}
    assert "interrupted" in rows["preempted"]
    assert "failed (exit 3)" in rows["gave-up"]
    assert "finished (resumed)" in rows["resumed"] and " 9 " in rows["resumed"]
