"""One agent per spool, even when agent.lock is deleted under a running agent: the agent holds the lock
through its open file and checks the path still names that file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradwatch.spool.format import SpoolLayout
from tests.conftest import free_port, http_json, wait_until

pytestmark = pytest.mark.integration


def _agent(home: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gradwatch", "agent", "--home", str(home), "--port",
                                 str(free_port())], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_a_deleted_lock_is_made_again_and_a_second_agent_is_refused(agent_process: Any, isolated_home: Path,
                                                                    tmp_path: Path) -> None:
    first = agent_process()
    lock = SpoolLayout(isolated_home).agent_lock_file
    lock.unlink()
    wait_until(lock.exists, what="the running agent to make agent.lock again")
    wait_until(lambda: "agent.lock at" in first.log.read_text() and "made again and locked" in first.log.read_text(),
               what="the agent to say so")
    second = _agent(isolated_home, tmp_path / "second.log")
    assert second.wait(timeout=60) != 0
    assert "another gradwatch agent already serves" in (tmp_path / "second.log").read_text()
    assert http_json(first.url + "/healthz")["ok"] is True


def test_when_another_process_locks_the_new_file_first_the_agent_leaves(agent_process: Any, isolated_home: Path) -> None:
    """The race a deleted lock opens, won by the other side: a second agent (here, this test) locks the new
    agent.lock before the running agent looks again. The running agent leaves, without writing its checkpoint
    over the spool the other one now serves."""
    import fcntl

    first = agent_process()
    layout = SpoolLayout(isolated_home)
    wait_until(layout.checkpoint_file.exists, what="a first checkpoint")
    layout.agent_lock_file.unlink()
    with open(layout.agent_lock_file, "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        layout.checkpoint_file.write_text("{}")  # the other agent's
        assert first.proc is not None
        first.proc.wait(timeout=30)
        assert first.proc.returncode == 0  # it left cleanly
        text = first.log.read_text()
        assert "has locked it since; stopping this one" in text
        assert layout.checkpoint_file.read_text() == "{}"
