"""Who can read and command a run: the spool is the user's alone, whatever the umask, and a probe takes
commands only from a file its user (or the spool's owner) owns and nobody else can write."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gradwatch
from gradwatch.spool.format import SpoolLayout
from tests.probe.helpers import tiny_model, train_steps
from tests.probe.test_guards_and_commands import _send


@pytest.fixture
def group_umask() -> Iterator[None]:
    old = os.umask(0o002)  # a shared machine's usual setting: group-writable by default
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_spool_is_private_whatever_the_umask(isolated_home: Path, group_umask: None) -> None:
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="private") as probe:
        train_steps(model, opt, probe, steps=2)
        probe.wait_ready()
    layout = SpoolLayout(isolated_home)
    run_dir = layout.run_dir("private")
    for directory in (isolated_home, layout.runs_dir, run_dir):
        assert _mode(directory) == 0o700, directory
    for path in (SpoolLayout.meta_file(run_dir, 0), SpoolLayout.records_file(run_dir, 0)):
        assert _mode(path) == 0o600, path  # metadata holds argv


def _commanded(probe: gradwatch.Probe, model: object, opt: object, steps: int = 40) -> bool:
    for _ in range(steps):
        train_steps(model, opt, probe, steps=1)  # type: ignore[arg-type]
        time.sleep(0.01)
    return bool(probe.learning_rates()[0] != 0.05)


def test_commands_in_a_file_others_can_write_are_ignored(isolated_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, opt = tiny_model()
    probe = gradwatch.attach(model, opt, run="shared")
    train_steps(model, opt, probe, steps=1)
    _send(probe, id="intruder", action={"type": "reduce_lr", "factor": 1e-6})
    assert probe.run_dir is not None
    commands = SpoolLayout.commands_file(probe.run_dir)
    commands.chmod(0o664)  # another user of the group could have appended that line
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        assert not _commanded(probe, model, opt)
    assert "ignoring the commands in" in caplog.text and "writable by its group (mode 664)" in caplog.text
    assert caplog.text.count("ignoring the commands in") == 1  # once, not once per poll
    commands.chmod(0o600)  # the user fixes it: the file's commands are the user's again
    assert _commanded(probe, model, opt)
    probe.close()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_commands_in_a_file_another_user_owns_are_ignored(isolated_home: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    model, opt = tiny_model()
    probe = gradwatch.attach(model, opt, run="foreign")
    train_steps(model, opt, probe, steps=1)
    _send(probe, id="intruder", action={"type": "stop"})
    assert probe.run_dir is not None
    os.chown(SpoolLayout.commands_file(probe.run_dir), 12345, 12345)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        assert not _commanded(probe, model, opt)
    assert not probe.should_stop and "it is owned by uid 12345" in caplog.text
    probe.close()
