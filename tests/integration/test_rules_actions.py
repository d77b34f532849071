"""Every action on a real training loop, decided by a real agent: early stop, LR reduction on a
plateau, LR cut on a spike, rewind, skip step, clipping; observe and dry-run modes; rules-file
reloads; and exactly-once commands across an agent killed with SIGKILL."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.daemon import Agent
from gradwatch.agent.settings import AgentConfig
from gradwatch.spool.format import SpoolLayout
from tests.conftest import SUPPORT, http_get, http_json, metric, parse_metrics, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(isolated_home: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[Agent] = []

    def start(rules: str | None = None) -> Agent:
        rules_file = None
        if rules is not None:
            rules_file = tmp_path / "agent-rules.yaml"
            rules_file.write_text(rules)
        daemon = Agent(AgentConfig(home=isolated_home, port=0, rules_file=rules_file))
        daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def train(home: Path, tmp_path: Path, *args: str, rules: str | None = None, env: dict[str, str] | None = None,
          timeout: float = 120) -> dict[str, Any]:
    """Run tests/support/rules_script.py to the end; returns what it wrote about itself."""
    result = tmp_path / "result.json"
    cmd = [sys.executable, str(SUPPORT / "rules_script.py"), "--result", str(result), "--sleep", "0.02", *args]
    if rules is not None:
        rules_file = tmp_path / "run-rules.yaml"
        rules_file.write_text(rules)
        cmd += ["--rules", str(rules_file)]
    done = subprocess.run(cmd, env={**os.environ, "GRADWATCH_HOME": str(home), **(env or {})}, capture_output=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(result.read_text())


def events(home: Path, run: str = "rules") -> list[dict[str, Any]]:
    path = SpoolLayout.events_file(SpoolLayout(home).run_dir(run))
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def settled(daemon: Agent, run: str = "rules") -> dict[str, Any]:
    """The run as the agent sees it once it has ingested everything the finished run wrote."""
    def done() -> dict[str, Any] | None:
        runs = [r for r in http_json(daemon.url + "/api/runs")["runs"] if r["run"] == run]
        return runs[0] if runs and runs[0]["status"] == "finished" else None

    return wait_until(done, timeout=30, what=f"run {run} finished at the agent")


def acted(home: Path, kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(decision, ack) pairs of commands of one action type."""
    evs = events(home)
    acks = {e["command"]: e for e in evs if e["event"] == "ack"}
    return [(e, acks[e["id"]]) for e in evs if e["event"] == "decision" and e["action"]["type"] == kind
            and e["mode"] == "act"]


EARLY_STOP = """
rules:
  - name: early-stop
    metric: val_loss
    detect: {type: early_stopping, patience: 3, min_delta: 0.0005}
    action: {type: stop}
    mode: act
"""


def test_early_stopping_stops_a_real_run_on_its_validation_loss(agent: Any, isolated_home: Path,
                                                                 tmp_path: Path) -> None:
    daemon = agent()
    result = train(isolated_home, tmp_path, "--steps", "2000", "--val-every", "10", rules=EARLY_STOP)
    run = settled(daemon)
    assert result["stopped_at"] is not None and result["steps"] < 2000
    [(decision, ack)] = acted(isolated_home, "stop")
    assert decision["reason"] == "patience_exhausted" and decision["rule"] == "early-stop"
    assert ack["status"] == "applied" and ack["step"] == result["stopped_at"]
    assert ack["step"] >= decision["step"]  # how soon: benchmarks/rule_latency.py
    assert result["stop_reason"] == f"rule early-stop: patience_exhausted (step {decision['step']})"
    assert run["ranks"][0]["actions"] == {"stop:patience_exhausted": 1}
    status = subprocess.run([sys.executable, "-m", "gradwatch", "status", "--url", daemon.url], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert "stopped" in next(line for line in status.splitlines() if "rules" in line)
    samples = parse_metrics(http_get(daemon.url + "/metrics").decode())
    assert metric(samples, "gradwatch_actions_total", run="rules", rank="0", action="stop",
                  reason="patience_exhausted") == 1
    assert metric(samples, "gradwatch_rule_decisions_total", run="rules", rank="0", rule="early-stop", action="stop",
                  mode="act") == 1


PLATEAU = """
rules:
  - name: plateau
    metric: val_loss
    detect: {type: plateau, patience: 2, threshold: 0.01}
    action: {type: reduce_lr, factor: 0.5, min_lr: 0.01}
    mode: act
"""


def test_reduce_lr_on_plateau_lowers_the_learning_rate_of_a_real_run_down_to_min_lr(
        agent: Any, isolated_home: Path, tmp_path: Path) -> None:
    daemon = agent()
    result = train(isolated_home, tmp_path, "--steps", "500", "--val-every", "10", rules=PLATEAU)
    settled(daemon)
    cuts = acted(isolated_home, "reduce_lr")
    assert len(cuts) >= 2
    assert all(d["reason"] == "plateau" for d, _ in cuts)
    # a cut with the LR at min_lr already changes nothing, and its acknowledgement says so
    assert all(a["status"] == "applied" or (a["status"] == "not_taken" and "min_lr" in a["detail"]) for _, a in cuts)
    lrs = result["lrs"]
    changes = [(i + 1, lrs[i]) for i in range(1, len(lrs)) if lrs[i] != lrs[i - 1]]
    assert [step for step, _ in changes] == [a["step"] for _, a in cuts if a["status"] == "applied"]
    assert lrs[-1] >= 0.01 and changes[0][1] == pytest.approx(0.025), "0.05 halved, never below min_lr"


SPIKE_CUT = """
rules:
  - name: loss-spike
    metric: loss
    detect: {type: spike, z_threshold: 6}
    action: {type: reduce_lr, factor: 0.1, min_lr: 0.001}
    mode: act
    cooldown_steps: 5
    max_actions: 2
"""


def test_a_loss_spike_cuts_the_learning_rate_bounded_by_max_actions(agent: Any, isolated_home: Path,
                                                                    tmp_path: Path) -> None:
    daemon = agent()
    result = train(isolated_home, tmp_path, "--steps", "260", "--lr-jump-at", "150", "--lr-jump", "20",
                   rules=SPIKE_CUT)
    run = settled(daemon)
    cuts = acted(isolated_home, "reduce_lr")
    assert 1 <= len(cuts) <= 2, "max_actions bounds the cuts"
    first_decision, first_ack = cuts[0]
    assert first_decision["step"] >= 150 and first_decision["details"]["z"] > 6
    assert first_ack["detail"] == "lr 1->0.1"
    assert first_ack["step"] >= first_decision["step"]
    assert result["lrs"][-1] < 1.0
    assert run["ranks"][0]["actions"]["reduce_lr:spike"] == len(cuts)


REWIND = """
guards:
  snapshots: {every: 25, keep: 3}
rules:
  - name: rewind
    metric: loss
    detect: {type: spike, z_threshold: 6}
    action: {type: rewind, skip_steps: 10, min_back_steps: 20}
    mode: act
    max_actions: 1
"""


def test_a_severe_spike_rewinds_to_a_snapshot_and_the_run_recovers(agent: Any, isolated_home: Path,
                                                                   tmp_path: Path) -> None:
    daemon = agent()
    result = train(isolated_home, tmp_path, "--steps", "260", "--lr-jump-at", "150", "--lr-jump", "30",
                   rules=REWIND)
    run = settled(daemon)
    [(decision, ack)] = acted(isolated_home, "rewind")
    assert ack["status"] == "applied", ack
    restored = int(ack["detail"].split("snapshot of step ")[1].split(";")[0])
    assert restored <= decision["step"] - 20 and restored % 25 == 0 and restored < 150
    losses = result["losses"]
    assert max(losses[150:ack["step"]]) > 100 * losses[140], "the run diverged"
    assert losses[-1] < 2 * min(losses[:150]), "and recovered"
    assert result["lrs"][-1] == 0.05, "the snapshot restored the learning rate before the jump"
    assert run["ranks"][0]["actions"] == {"rewind:spike": 1, "skip_step:rewind": 10}


REWIND_NO_LIMIT = REWIND.replace("    max_actions: 1\n", "")  # cooldown 0, no max: only the acks pace it


def test_one_spike_one_rewind_the_rule_waits_for_the_acknowledgement(agent: Any, isolated_home: Path,
                                                                     tmp_path: Path) -> None:
    """The spike lasts several records before the probe applies the rewind: deciding again on those
    pre-rewind records would rewind twice and skip twice the updates."""
    daemon = agent()
    train(isolated_home, tmp_path, "--steps", "260", "--lr-jump-at", "150", "--lr-jump", "30", rules=REWIND_NO_LIMIT)
    run = settled(daemon)
    rewinds = acted(isolated_home, "rewind")
    assert len(rewinds) == 1, [(d["step"], a["step"]) for d, a in rewinds]
    decisions = [e for e in events(isolated_home) if e["event"] == "decision" and e["rule"] == "rewind"]
    assert len(decisions) == 1
    assert run["ranks"][0]["actions"] == {"rewind:spike": 1, "skip_step:rewind": 10}


SPIKE_CUT_NO_LIMIT = SPIKE_CUT.replace("    cooldown_steps: 5\n    max_actions: 2\n", "")


def test_an_lr_cut_is_not_decided_again_on_records_from_before_it_took_effect(agent: Any, isolated_home: Path,
                                                                              tmp_path: Path) -> None:
    daemon = agent()
    train(isolated_home, tmp_path, "--steps", "260", "--lr-jump-at", "150", "--lr-jump", "20", rules=SPIKE_CUT_NO_LIMIT)
    settled(daemon)
    cuts = acted(isolated_home, "reduce_lr")
    assert cuts
    for (_, earlier_ack), (later, _) in itertools.pairwise(cuts):
        assert later["step"] > earlier_ack["step"], "a second cut decided on records from before the first applied"


TYPO = """
rules:
  - name: early-stop
    metric: val_los
    detect: {type: early_stopping, patience: 3}
    action: {type: stop}
    mode: act
"""


def test_a_rule_on_a_metric_the_run_never_records_is_reported_once(agent: Any, isolated_home: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    daemon = agent()
    train(isolated_home, tmp_path, "--steps", "520", "--val-every", "10", "--sleep", "0.0", rules=TYPO)
    run = settled(daemon)
    assert run["rules"]["unseen_metrics"] == {"early-stop": "val_los"}
    status = subprocess.run([sys.executable, "-m", "gradwatch", "status", "--url", daemon.url], capture_output=True,
                            text=True, timeout=60, check=False)
    assert "rule early-stop watches metric 'val_los', which the run has not recorded" in status.stdout, status.stdout
    warnings = [r for r in caplog.records if "watches metric 'val_los'" in r.getMessage()]
    assert len(warnings) == 1, warnings


GUARDS = """
guards:
  skip: {on_nonfinite: act}
  clip: {scheme: zclip, max_norm: null}
rules: []
"""


def test_guards_skip_a_nan_step_at_that_step_and_export_the_clip_threshold(agent: Any, isolated_home: Path,
                                                                           tmp_path: Path) -> None:
    daemon = agent()
    result = train(isolated_home, tmp_path, "--steps", "120", "--nan-at", "60", "--lr-jump-at", "100", rules=GUARDS)
    run = settled(daemon)
    assert all(math.isfinite(p) for p in result["params"]), "the NaN step did not reach the weights"
    [skip] = [e for e in events(isolated_home) if e["event"] == "skip_step"]
    assert (skip["step"], skip["reason"]) == (60, "nonfinite")
    rank = run["ranks"][0]
    assert rank["actions"] == {"skip_step:nonfinite": 1}
    samples = parse_metrics(http_get(daemon.url + "/metrics").decode())
    assert metric(samples, "gradwatch_clip_threshold", run="rules", rank="0") == rank["clip_threshold"] > 0
    fraction = metric(samples, "gradwatch_clipped_fraction", run="rules", rank="0")
    assert fraction is not None and 0 < fraction < 0.5
    guarded = 120 - 25 - 1  # no threshold during ZClip's 25 warm-up steps (no cap set) nor at the skipped step
    assert metric(samples, "gradwatch_clipped_steps_total", run="rules", rank="0") == round(fraction * guarded)


def test_observe_and_dry_run_record_decisions_but_change_nothing(agent: Any, isolated_home: Path,
                                                                 tmp_path: Path) -> None:
    daemon = agent()
    observe = SPIKE_CUT.replace("mode: act", "mode: observe")
    result = train(isolated_home, tmp_path, "--steps", "200", "--lr-jump-at", "150", "--lr-jump", "20",
                   rules=observe)
    settled(daemon)
    decisions = [e for e in events(isolated_home) if e["event"] == "decision"]
    assert decisions and all(d["mode"] == "observe" and "sent" not in d for d in decisions)
    assert not SpoolLayout.commands_file(SpoolLayout(isolated_home).run_dir("rules")).exists()
    assert result["lrs"][-1] == 1.0, "the jumped LR was left alone"

    dry = "dry_run: true\n" + SPIKE_CUT
    train(isolated_home, tmp_path, "--run-name", "dry", "--steps", "200", "--lr-jump-at", "150", "--lr-jump", "20",
          rules=dry)
    settled(daemon, "dry")
    assert {d["mode"] for d in events(isolated_home, "dry") if d["event"] == "decision"} == {"dry_run"}


def test_the_agent_reloads_its_rules_file_and_keeps_the_old_rules_when_the_new_file_is_bad(
        agent: Any, isolated_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    daemon = agent(rules="rules: []\n")
    path = daemon.config.rules_file
    assert path is not None
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "rules_script.py"), "--steps", "1500", "--sleep", "0.02",
                             "--val-every", "10"], env={**os.environ, "GRADWATCH_HOME": str(isolated_home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: http_json(daemon.url + "/api/runs")["runs"], timeout=30, what="the run")
        path.write_text(EARLY_STOP.replace("patience: 3", "patience: three"))  # invalid: rejected
        wait_until(lambda: daemon.rules.reloads["rejected"] == 1, timeout=15, what="the bad file rejected")
        assert "line 5: rules[0].detect.patience = 'three'" in (daemon.rules.last_error or "")
        assert daemon.rules.config.rules == [], "the previous rules stay in force"
        path.write_text(EARLY_STOP)  # valid: the running run follows it
        wait_until(lambda: daemon.rules.reloads["ok"] == 1, timeout=15, what="the good file loaded")
        assert proc.wait(timeout=90) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    settled(daemon)
    [(_, ack)] = acted(isolated_home, "stop")
    assert ack["status"] == "applied"
    samples = parse_metrics(http_get(daemon.url + "/metrics").decode())
    assert metric(samples, "gradwatch_agent_rules_reloads_total", result="ok") == 1
    assert metric(samples, "gradwatch_agent_rules_reloads_total", result="rejected") == 1


CUT_EVERY_SPIKE = """
rules:
  - name: hot
    metric: hot
    detect: {type: threshold, above: 0.5}
    action: {type: reduce_lr, factor: 0.9}
    mode: act
"""


def test_commands_are_applied_exactly_once_across_an_agent_killed_with_sigkill(agent_process: Any,
                                                                               isolated_home: Path,
                                                                               tmp_path: Path) -> None:
    rules = tmp_path / "agent-rules.yaml"
    rules.write_text(CUT_EVERY_SPIKE)
    first = agent_process("--rules", str(rules))
    url = first.url
    script = SUPPORT / "rules_script.py"
    code = script.read_text().replace('probe.log(**values)',
                                      'values["hot"] = 1.0 if step % 40 == 0 else 0.0\n            probe.log(**values)')
    hot_script = tmp_path / "hot_script.py"
    hot_script.write_text(code)
    result_file = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, str(hot_script), "--steps", "400", "--sleep", "0.02",
                             "--result", str(result_file)],
                            env={**os.environ, "GRADWATCH_HOME": str(isolated_home)}, stderr=subprocess.PIPE)
    try:
        def commands() -> list[dict[str, Any]]:
            path = SpoolLayout.commands_file(SpoolLayout(isolated_home).run_dir("rules"))
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        wait_until(lambda: len(commands()) >= 2, timeout=60, what="two commands")
        first.stop(signal.SIGKILL)  # before its checkpoint: the restarted agent re-reads those records
        agent_process("--rules", str(rules), port=first.port)
        assert proc.wait(timeout=90) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    result = json.loads(result_file.read_text())
    wait_until(lambda: [r for r in http_json(url + "/api/runs")["runs"] if r["status"] == "finished"], timeout=30,
               what="the run finished at the restarted agent")
    ids = [c["id"] for c in commands()]
    assert ids == [f"hot@{step}" for step in range(40, 401, 40)], "each decision became exactly one command"
    acks = [e for e in events(isolated_home) if e["event"] == "ack"]
    acked = [a["command"] for a in acks]
    assert len(acked) == len(set(acked)) >= 2, "no command applied twice"
    assert set(acked) <= set(ids[:-1]), "the last came after the last step"
    assert result["lrs"][-1] == pytest.approx(0.05 * 0.9 ** len(acked), rel=1e-9), "each acked cut applied once"
