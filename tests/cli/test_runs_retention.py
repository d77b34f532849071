"""``gradwatch runs ls | rm | prune``: what the spool holds, and removing old runs without ever removing one a
probe may still write to."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradwatch.cli import main
from gradwatch.retention import parse_age
from tests.agent.helpers import SpoolBuilder

DAY = 86400.0


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """Runs of every kind: two ended long ago, one crashed long ago (its process gone), one running (this process),
    one on another machine without an end record (this one cannot tell), and one that ended an hour ago."""
    home = tmp_path / "home"
    builder = SpoolBuilder(home)
    old = time.time() - 40 * DAY
    host = socket.gethostname()
    for run in ("old-finished", "old-stopped"):
        builder.start(run, t=old)
        builder.steps(run, 0, 1, 5, t0=old)
        builder.end(run, 0, 5, status="finished" if run == "old-finished" else "stopped", t=old + 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    builder.start("old-crashed", t=old, host=host, pid=dead.pid)
    builder.steps("old-crashed", 0, 1, 3, t0=old)
    builder.start("live", t=old, host=host, pid=os.getpid())
    builder.steps("live", 0, 1, 3, t0=old)  # quiet for weeks, but its process lives
    builder.start("elsewhere", t=old, host="node-9", pid=12345)
    builder.steps("elsewhere", 0, 1, 3, t0=old)
    recent = time.time() - 3600
    builder.start("recent", t=recent)
    builder.steps("recent", 0, 1, 5, t0=recent)
    builder.end("recent", 0, 5, t=recent + 1)
    return home


def _ls(home: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    main(["runs", "ls", "--home", str(home), "--json"])
    return {row["run"]: row for row in json.loads(capsys.readouterr().out)}


def test_ls_says_what_each_run_is_and_how_much_it_takes(spool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = _ls(spool, capsys)
    assert {name: row["status"] for name, row in runs.items()} == {
        "old-finished": "finished", "old-stopped": "stopped", "old-crashed": "crashed", "live": "running",
        "elsewhere": "unknown", "recent": "finished"}
    assert runs["old-finished"]["steps"] == 5 and runs["old-finished"]["size_bytes"] > 0
    assert 39 * DAY < runs["old-finished"]["last_record_age_seconds"] < 41 * DAY  # type: ignore[operator]
    main(["runs", "ls", "--home", str(spool)])
    table = capsys.readouterr().out
    assert "old-crashed" in table and "crashed" in table and "6 run(s)" in table


def test_prune_removes_old_ended_runs_and_keeps_what_may_still_be_written(
        spool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["runs", "prune", "--home", str(spool), "--older-than", "30d", "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("would remove") == 3 and len(_ls(spool, capsys)) == 6  # nothing removed
    main(["runs", "prune", "--home", str(spool), "--older-than", "30d", "--yes"])
    assert "3 run(s) removed" in capsys.readouterr().out
    assert sorted(_ls(spool, capsys)) == ["elsewhere", "live", "recent"]
    main(["runs", "prune", "--home", str(spool), "--older-than", "30m", "--yes"])
    capsys.readouterr()
    assert sorted(_ls(spool, capsys)) == ["elsewhere", "live"]


def test_rm_refuses_a_live_run_unless_forced_and_asks_first(spool: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        main(["runs", "rm", "live", "old-finished", "--home", str(spool), "--yes"])
    assert "run 'live' is running" in capsys.readouterr().err
    assert "old-finished" in _ls(spool, capsys)  # nothing removed when one of the names is refused
    with open(os.devnull) as no_terminal:  # nobody to ask (CI, cron)
        monkeypatch.setattr(sys, "stdin", no_terminal)
        with pytest.raises(SystemExit):
            main(["runs", "rm", "old-finished", "--home", str(spool)])
    assert "run again with --yes" in capsys.readouterr().err
    main(["runs", "rm", "old-finished", "live", "--home", str(spool), "--yes", "--force"])
    assert "2 run(s) removed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["runs", "rm", "no-such-run", "--home", str(spool), "--yes"])
    assert "no run 'no-such-run'" in capsys.readouterr().err


@pytest.mark.parametrize("text, seconds", [("30d", 30 * DAY), ("12h", 12 * 3600.0), ("90m", 5400.0), ("2w", 14 * DAY),
                                           ("3600s", 3600.0), (" 1.5d ", 1.5 * DAY)])
def test_ages_read_as_people_write_them(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["30", "d", "30 days", "-1d", ""])
def test_a_bad_age_names_the_value_and_the_form(text: str, spool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["runs", "prune", "--home", str(spool), "--older-than", text])
    assert f"--older-than {text!r}: give a number and a unit" in capsys.readouterr().err


@pytest.mark.integration
def test_a_running_agent_forgets_a_removed_run(spool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradwatch.agent.daemon import Agent
    from gradwatch.agent.settings import AgentConfig
    from tests.conftest import http_get, http_json, wait_until

    agent = Agent(AgentConfig(home=spool, port=0))
    agent.start()
    try:
        def listed() -> set[str]:
            return {r["run"] for r in http_json(agent.url + "/api/runs")["runs"]}

        wait_until(lambda: "recent" in listed(), timeout=30, what="the agent read the spool")
        main(["runs", "rm", "recent", "--home", str(spool), "--yes"])
        wait_until(lambda: "recent" not in listed(), timeout=30, what="the agent forgot the removed run")
        assert b'run="recent"' not in http_get(agent.url + "/metrics")
    finally:
        agent.stop()
