"""A spool nothing in it can knock the agent over with: a real agent process beside a healthy run.

Every hostile run below sits in the same spool as one healthy run. For each: the agent keeps serving
(/metrics, /healthz, /api/runs), the healthy run's counts stay exact, the bad input is reported once
(one warning naming it, not one per rescan), and the agent's CPU goes back to idle (no busy loop).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gradwatch.spool.format import FORMAT_NAME, SpoolLayout
from gradwatch.spool.records import RunMeta, meta_to_json
from tests.agent.helpers import SpoolBuilder
from tests.conftest import AgentProcess, http_get, http_json, metric, parse_metrics, wait_until

pytestmark = pytest.mark.integration

HOST = socket.gethostname()
RULES = """
rules:
  - name: hot-loss
    metric: loss
    detect: {type: threshold, above: 100}
    action: {type: stop}
    mode: observe
"""


def _meta(run: str, **fields: Any) -> dict[str, Any]:
    body = meta_to_json(RunMeta(run=run, rank=0, world_size=1, host=HOST, pid=os.getpid(), start_time=time.time()))
    return {**body, **fields}


def _step(step: int, **extra: Any) -> bytes:
    return (json.dumps({"kind": "step", "step": step, "t": time.time(), "grad_norm": 1.0, "lr": [0.1], "dur": 0.1,
                        **extra}) + "\n").encode()


def _run(home: Path, run: str, meta: dict[str, Any] | None, records: bytes | None) -> Path:
    run_dir = SpoolLayout(home).run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        SpoolLayout.meta_file(run_dir, 0).write_text(json.dumps(meta))
    if records is not None:
        SpoolLayout.records_file(run_dir, 0).write_bytes(records)
    return run_dir


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- the hostile runs: each writes its files; the test checks what every one of them must give ---------------
def partial_line_process_alive(home: Path) -> None:
    """A full disk: the last line stays unfinished while the process lives."""
    _run(home, "partial-alive", _meta("partial-alive"), b"".join(_step(s) for s in (1, 2, 3)) + b'{"kind":"step","st')


def partial_line_process_dead(home: Path) -> None:
    """A writer killed mid-line."""
    _run(home, "partial-dead", _meta("partial-dead", pid=_dead_pid()),
         b"".join(_step(s) for s in (1, 2, 3)) + b'{"kind":"step","st')


def line_over_the_size_limit(home: Path) -> None:
    big = b'{"kind":"log","step":3,"t":1.0,"values":{"x":"' + b"y" * (9 * 1024 * 1024) + b'"}}\n'
    _run(home, "oversize", _meta("oversize"), _step(1) + _step(2) + big + _step(3) + _step(4))


def corrupt_metadata(home: Path) -> None:
    run_dir = _run(home, "corrupt-meta", None, _step(1))
    SpoolLayout.meta_file(run_dir, 0).write_text('{"format": "gradwatch-spool", "run": ')


def numbers_beyond_float_range(home: Path) -> None:
    huge = 10**400
    _run(home, "huge-numbers", _meta("huge-numbers"),
         _step(1) + json.dumps({"kind": "log", "step": 1, "t": time.time(), "values": {"loss": huge}}).encode() + b"\n"
         + json.dumps({"kind": "step", "step": huge, "t": time.time()}).encode() + b"\n" + _step(2)
         + json.dumps({"kind": "step", "step": 3, "t": time.time(), "values": {"acc": huge, "n": 1}}).encode() + b"\n")


def fields_of_the_wrong_type(home: Path) -> None:
    _run(home, "wrong-types", _meta("wrong-types", labels="not-a-mapping", start_time="yesterday", pid="12"),
         _step(1) + _step(2) + json.dumps({"kind": "end", "step": 2, "t": time.time(), "status": "failed",
                                           "error": {"not": "a string"}}).encode() + b"\n")


def metadata_without_pid(home: Path) -> None:
    meta = _meta("no-pid")
    del meta["pid"]
    _run(home, "no-pid", meta, _step(1))


def fifo_as_metadata(home: Path) -> None:
    run_dir = _run(home, "fifo-meta", None, _step(1))
    os.mkfifo(SpoolLayout.meta_file(run_dir, 0))


def fifo_as_records(home: Path) -> None:
    run_dir = _run(home, "fifo-records", _meta("fifo-records"), None)
    os.mkfifo(SpoolLayout.records_file(run_dir, 0))


def fifo_as_events(home: Path) -> None:
    """The agent writes this run's decisions to events.jsonl: a FIFO there must not block its loop."""
    run_dir = _run(home, "fifo-events", _meta("fifo-events"),
                   _step(1) + json.dumps({"kind": "log", "step": 1, "t": time.time(), "values": {"loss": 1e6}}).encode()
                   + b"\n")
    os.mkfifo(SpoolLayout.events_file(run_dir))


def directory_as_records(home: Path) -> None:
    run_dir = _run(home, "dir-records", _meta("dir-records"), None)
    SpoolLayout.records_file(run_dir, 0).mkdir()


HOSTILE: list[Callable[[Path], None]] = [
    partial_line_process_alive, partial_line_process_dead, line_over_the_size_limit, corrupt_metadata,
    numbers_beyond_float_range, fields_of_the_wrong_type, metadata_without_pid, fifo_as_metadata, fifo_as_records,
    fifo_as_events, directory_as_records,
]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _warnings_naming(log: Path, needle: str) -> list[str]:
    """The agent's warnings and errors that name ``needle``, less the alerts its rules fire (working as meant)."""
    return [line for line in log.read_text(errors="replace").splitlines()
            if needle in line and (" WARNING " in line or " ERROR " in line) and ": ALERT " not in line]


def _start(tmp_path: Path, agent_process: Any) -> AgentProcess:
    config, rules = tmp_path / "agent.yaml", tmp_path / "rules.yaml"
    config.write_text("stuck_after_seconds: 2\nrescan_interval_seconds: 1\n")
    rules.write_text(RULES)
    return agent_process("--config", str(config), "--rules", str(rules))  # type: ignore[no-any-return]


def test_a_hostile_spool_costs_only_the_runs_it_is_in(agent_process: Any, isolated_home: Path,
                                                       tmp_path: Path) -> None:
    healthy = SpoolBuilder(isolated_home)
    healthy.start("healthy", t=time.time())
    healthy.steps("healthy", 0, 1, 50, t0=time.time(), nan_every=10)
    for make in HOSTILE:
        make(isolated_home)
    agent = _start(tmp_path, agent_process)
    healthy.steps("healthy", 0, 51, 100, t0=time.time(), nan_every=10)

    def settled() -> dict[Any, float] | None:
        samples = agent.metrics()
        done = metric(samples, "gradwatch_steps_total", run="healthy", rank="0", optimizer="0") == 100 and \
            metric(samples, "gradwatch_agent_runs_faulty", stage="stuck") == 1
        return samples if done else None

    wait_until(settled, timeout=30, what="the healthy run's 100 steps and the stuck run reported")
    time.sleep(3)  # three more rescans: a second report, or a loop that spins, would show now
    assert agent.proc is not None
    before = _cpu_seconds(agent.proc.pid)
    time.sleep(3)
    assert _cpu_seconds(agent.proc.pid) - before < 0.6, "the agent did not go back to idle (a busy loop)"

    samples = parse_metrics(http_get(agent.url + "/metrics").decode())  # served: HTTP 200
    assert http_json(agent.url + "/healthz")["ok"] is True

    # the healthy run's counts are exact
    assert metric(samples, "gradwatch_steps_total", run="healthy", rank="0", optimizer="0") == 100
    assert metric(samples, "gradwatch_nonfinite_total", run="healthy", rank="0", quantity="loss") == 10
    assert metric(samples, "gradwatch_samples_total", run="healthy", rank="0") == 800

    def steps(run: str) -> float | None:
        return metric(samples, "gradwatch_steps_total", run=run, rank="0", optimizer="0")

    rejected = {reason: metric(samples, "gradwatch_agent_records_rejected_total", reason=reason)
                for reason in ("malformed", "invalid", "oversize", "truncated")}
    # a partial line of a live process: its complete records are in, and it is reported stuck
    assert steps("partial-alive") == 3
    runs = {r["run"]: r for r in http_json(agent.url + "/api/runs")["runs"]}
    assert [f["stage"] for f in runs["partial-alive"]["faults"]] == ["stuck"]
    assert "mid-line" in runs["partial-alive"]["faults"][0]["message"]
    # a partial line of a process that died: dropped as truncated, the run crashed
    assert steps("partial-dead") == 3 and runs["partial-dead"]["status"] == "crashed" and rejected["truncated"] == 1
    # a line over 8 MiB: rejected, the records after it are read
    assert steps("oversize") == 4 and rejected["oversize"] == 1
    # corrupt metadata: the run is refused, with the file named
    assert runs["corrupt-meta"]["status"] == "rejected" and "rank-0.meta.json" in runs["corrupt-meta"]["error"]
    # an integer beyond float range: a step number that big is refused; a logged value is infinite
    assert steps("huge-numbers") == 3 and rejected["invalid"] == 1
    assert metric(samples, "gradwatch_nonfinite_total", run="huge-numbers", rank="0", quantity="loss") == 1
    assert samples[("gradwatch_metric", frozenset({("run", "huge-numbers"), ("rank", "0"), ("name", "n")}))] == 1
    # fields of the wrong type are ignored, the rest of the metadata and records is used
    assert steps("wrong-types") == 2 and runs["wrong-types"]["labels"] == {}
    assert runs["wrong-types"]["ranks"][0]["end_status"] == "failed"
    assert steps("no-pid") == 1
    # FIFOs and directories in a file's place are never opened; an events FIFO costs only the run's events
    assert steps("fifo-events") == 1
    assert steps("fifo-records") == 0 and steps("dir-records") == 0  # the metadata is read, the records never
    assert runs["fifo-meta"]["status"] == "faulty" and "FIFO" in runs["fifo-meta"]["faults"][0]["message"]
    for run, kind in (("fifo-records", "a FIFO"), ("dir-records", "a directory")):
        assert [(f["stage"], f["message"]) for f in runs[run]["faults"]] == [
            ("files", f"rank-0.records.jsonl is {kind}, not a regular file: remove it")]
    assert rejected["malformed"] == 0  # nothing above was mistaken for a torn line

    # each reported once, in one warning, however many rescans saw it
    for needle in ("partial-alive", "oversize", "corrupt-meta", "huge-numbers", "fifo-meta", "fifo-records",
                   "fifo-events"):
        assert len(_warnings_naming(agent.log, needle)) == 1, (needle, _warnings_naming(agent.log, needle))
    assert _warnings_naming(agent.log, "healthy") == []


def test_numbers_beyond_float_range_survive_a_restart(agent_process: Any, isolated_home: Path,
                                                      tmp_path: Path) -> None:
    """The agent's checkpoint holds what it read: a restarted agent serves /metrics with the same counts."""
    numbers_beyond_float_range(isolated_home)
    agent = _start(tmp_path, agent_process)
    wait_until(lambda: metric(agent.metrics(), "gradwatch_steps_total", run="huge-numbers", rank="0",
                              optimizer="0") == 3, what="the run read")
    agent.stop()
    agent = _start(tmp_path, agent_process)
    samples = agent.metrics()
    assert metric(samples, "gradwatch_nonfinite_total", run="huge-numbers", rank="0", quantity="loss") == 1
    assert metric(samples, "gradwatch_steps_total", run="huge-numbers", rank="0", optimizer="0") == 3


def _meta_with_uid(run: str, uid: str) -> dict[str, Any]:
    return _meta(run, run_uid=uid, host="elsewhere")


def test_a_truncated_records_file_starts_a_new_run(agent_process: Any, isolated_home: Path, tmp_path: Path) -> None:
    run_dir = _run(isolated_home, "cut", _meta_with_uid("cut", "a"), b"".join(_step(s) for s in range(1, 11)))
    agent = _start(tmp_path, agent_process)
    wait_until(lambda: metric(agent.metrics(), "gradwatch_steps_total", run="cut", rank="0", optimizer="0") == 10,
               what="the first run read")
    SpoolLayout.records_file(run_dir, 0).write_bytes(_step(1) + _step(2))  # truncated, then rewritten
    wait_until(lambda: metric(agent.metrics(), "gradwatch_steps_total", run="cut", rank="0", optimizer="0") == 2,
               what="the new incarnation read from its start")
    with open(SpoolLayout.records_file(run_dir, 0), "ab") as f:
        f.write(_step(3))
    wait_until(lambda: metric(agent.metrics(), "gradwatch_steps_total", run="cut", rank="0", optimizer="0") == 3,
               what="and followed")


def test_a_run_directory_recreated_while_the_agent_was_down_is_read_from_its_start(
        agent_process: Any, isolated_home: Path, tmp_path: Path) -> None:
    _run(isolated_home, "again", _meta_with_uid("again", "first"), b"".join(_step(s) for s in range(1, 6)))
    agent = _start(tmp_path, agent_process)
    wait_until(lambda: metric(agent.metrics(), "gradwatch_steps_total", run="again", rank="0", optimizer="0") == 5,
               what="the first run read")
    agent.stop()
    run_dir = SpoolLayout(isolated_home).run_dir("again")
    for path in run_dir.iterdir():
        path.unlink()
    run_dir.rmdir()
    # a new run under the same name, longer than the old one: read from byte 0, not from the old offset
    _run(isolated_home, "again", _meta_with_uid("again", "second"),
         b"".join(_step(s, values={"loss": 0.5}) for s in range(1, 21)))
    agent = _start(tmp_path, agent_process)
    wait_until(lambda: metric(agent.metrics(), "gradwatch_steps_total", run="again", rank="0", optimizer="0") == 20,
               what="the new run read in full")
    assert metric(agent.metrics(), "gradwatch_agent_records_rejected_total", reason="malformed") == 0


def test_a_retired_runs_name_reused_is_read_as_a_new_run(agent_process: Any, isolated_home: Path,
                                                          tmp_path: Path) -> None:
    records = b"".join(_step(s) for s in range(1, 9)) + json.dumps(
        {"kind": "end", "step": 8, "t": time.time(), "status": "finished"}).encode() + b"\n"
    _run(isolated_home, "reused", _meta_with_uid("reused", "old"), records)
    config = tmp_path / "agent.yaml"
    config.write_text("ended_ttl_seconds: 0.5\nrescan_interval_seconds: 0.5\n")
    agent = agent_process("--config", str(config))
    wait_until(lambda: http_json(agent.url + "/healthz")["runs"]["finished"] == 0 and
               metric(agent.metrics(), "gradwatch_steps_total", run="reused", rank="0", optimizer="0") is None,
               what="the run retired")
    run_dir = SpoolLayout(isolated_home).run_dir("reused")
    for path in run_dir.iterdir():
        path.unlink()
    # a new run, with fewer bytes of records than the retired one had
    _run(isolated_home, "reused", _meta_with_uid("reused", "new"), _step(1) + _step(2))
    wait_until(lambda: metric(agent.metrics(), "gradwatch_steps_total", run="reused", rank="0", optimizer="0") == 2,
               what="the new run under the old name")


def test_a_format_name_that_is_not_ours_is_refused_not_read(agent_process: Any, isolated_home: Path,
                                                             tmp_path: Path) -> None:
    _run(isolated_home, "foreign", {**_meta("foreign"), "format": "not-" + FORMAT_NAME}, _step(1))
    agent = _start(tmp_path, agent_process)
    wait_until(lambda: any(r["run"] == "foreign" and r["status"] == "rejected"
                           for r in http_json(agent.url + "/api/runs")["runs"]), what="the run refused")
