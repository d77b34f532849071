"""The probe never takes training down: bounded memory, unwritable spool, our own bugs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gradwatch
from gradwatch.probes import probe as probe_module
from tests.probe.helpers import logged, read_run, tiny_model, train_steps


def test_a_full_queue_drops_and_counts_instead_of_blocking(isolated_home: Path) -> None:
    model, opt = tiny_model()
    # The writer only wakes every hour: nothing leaves the queue while we train.
    probe = gradwatch.attach(model, opt, run="full", max_queue=10, flush_interval=3600)
    # 41 items into a queue of 10: 20 steps, 20 logs and step 1's activation sample (queued after step 1's log)
    train_steps(model, opt, probe, steps=20)
    assert len(probe._queue) == 10
    assert probe.dropped == 31
    probe.close()
    _, records = read_run(isolated_home, "full")
    # the 10 queue items: steps 1-5, the logs of steps 1-4 merged into them, the activation sample
    assert len(logged(records)) == 4 and len([r for r in records if r["kind"] == "step"]) == 5
    assert [r["kind"] for r in records].count("activations") == 1
    assert records[-1]["dropped"] == 31  # the loss is reported to the agent


def test_unwritable_spool_warns_once_and_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A path under a regular file can never be created, whoever runs the test (root included).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    _train_with_unusable_home(blocker / "home", caplog)


def _train_with_unusable_home(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, opt = tiny_model()
    # The writer drains once, at close: every log merges into its step record, so the count is exact.
    probe = gradwatch.attach(model, opt, run="nowhere", home=home, flush_interval=3600)
    losses = train_steps(model, opt, probe, steps=30)
    probe.close()
    assert len(losses) == 30 and not any(math.isnan(loss) for loss in losses)
    # 30 step records (each with its log merged in), step 1's activation sample and the end record
    assert probe.dropped == 32
    warnings = [r.getMessage() for r in caplog.records if r.name == "gradwatch"]
    assert len(warnings) == 1 and "GRADWATCH_HOME" in warnings[0], warnings


def test_disk_errors_while_writing_are_counted_and_retried(isolated_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from gradwatch.spool import writer

    failures = {"left": 2}
    real_append = writer.RecordFileWriter.append

    def flaky_append(self: writer.RecordFileWriter, data: bytes) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        real_append(self, data)

    monkeypatch.setattr(writer.RecordFileWriter, "append", flaky_append)
    monkeypatch.setattr("gradwatch.probes.spool_session.RETRY_OPEN_SECONDS", 0.0)
    model, opt = tiny_model()
    probe = gradwatch.attach(model, opt, run="disk-full", flush_interval=3600)
    train_steps(model, opt, probe, steps=3)
    probe._writer._drain()  # fails: 3 step records and step 1's activation sample dropped
    train_steps(model, opt, probe, steps=2)
    probe._writer._drain()  # fails again: 2 more
    train_steps(model, opt, probe, steps=1)
    probe.close()  # writes
    _, records = read_run(isolated_home, "disk-full")
    assert [r["step"] for r in records if r["kind"] == "step"] == [6]
    assert records[-1]["dropped"] == 6 and probe.dropped == 6
    assert len([r for r in caplog.records if "No space left" in r.getMessage()]) == 1


def test_a_bug_in_our_hook_is_caught_counted_and_reported_once(isolated_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: object, reuse: object = None) -> None:
        raise RuntimeError("bug in gradwatch")

    monkeypatch.setattr(probe_module.GradNormMeter, "__call__", broken)
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="buggy") as probe:
        losses = train_steps(model, opt, probe, steps=5)
    assert len(losses) == 5 and probe.internal_errors == 5
    assert len([r for r in caplog.records if "bug in gradwatch" in r.getMessage()]) == 1
    _, records = read_run(isolated_home, "buggy")
    assert [r["grad_norm"] for r in records if r["kind"] == "step"] == [None] * 5  # the rest still recorded


def test_training_thread_does_no_file_io(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every open() and write of the spool happens on the writer thread."""
    import builtins

    training_thread = threading.get_ident()
    opened_on_training_thread = []
    real_open = builtins.open

    def spying_open(file: object, *args: object, **kwargs: object) -> object:
        if threading.get_ident() == training_thread and str(isolated_home) in str(file):
            opened_on_training_thread.append(str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", spying_open)
    model, opt = tiny_model()
    probe = gradwatch.attach(model, opt, run="io", flush_interval=0.01)
    probe.wait_ready()
    train_steps(model, opt, probe, steps=20)
    probe.close()
    assert opened_on_training_thread == []
    _, records = read_run(isolated_home, "io")
    assert len([r for r in records if r["kind"] == "step"]) == 20 and len(logged(records)) == 20


_SCRIPT_HEAD = (
    "import os, time, torch, gradwatch\n"
    "m = torch.nn.Linear(2, 1); o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
)


def _run_script(tmp_path: Path, body: str, env: dict[str, str] | None = None,
                wait: bool = True) -> subprocess.CompletedProcess[str] | subprocess.Popen[bytes]:
    """Run a small training script that starts with a Linear model `m` and its optimizer `o`."""
    script = tmp_path / f"script_{len(list(tmp_path.glob('script_*.py')))}.py"
    script.write_text(_SCRIPT_HEAD + body)
    full_env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen([sys.executable, str(script)], env=full_env)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=full_env)


def test_uncaught_exception_marks_the_run_failed_at_exit(isolated_home: Path, tmp_path: Path) -> None:
    result = _run_script(tmp_path, "p = gradwatch.attach(m, o, run='crashy')\n"
                                   "m(torch.randn(3, 2)).sum().backward(); o.step()\n"
                                   "raise SystemError('the script failed')\n")
    assert result.returncode == 1 and "the script failed" in result.stderr
    _, records = read_run(isolated_home, "crashy")
    assert records[-1]["status"] == "failed" and "the script failed" in records[-1]["error"]


def test_a_script_that_ends_without_close_is_marked_finished(isolated_home: Path, tmp_path: Path) -> None:
    result = _run_script(tmp_path, "p = gradwatch.attach(m, o, run='plain')\n"
                                   "for _ in range(3):\n"
                                   "    loss = m(torch.randn(3, 2)).sum(); o.zero_grad(); loss.backward(); o.step()\n"
                                   "    p.log(loss=loss)\n")
    assert result.returncode == 0, result.stderr
    _, records = read_run(isolated_home, "plain")
    assert [r["kind"] for r in records] == ["step"] * 3 + ["end"] and len(logged(records)) == 3
    assert records[-1]["status"] == "finished"


def test_close_is_idempotent_and_log_after_close_is_ignored(isolated_home: Path) -> None:
    model, opt = tiny_model()
    probe = gradwatch.attach(model, opt, run="closed")
    probe.close()
    probe.close()
    probe.log(loss=1.0)
    train_steps(model, opt, None, steps=2)  # hooks removed: no records, no errors
    _, records = read_run(isolated_home, "closed")
    assert [r["kind"] for r in records] == ["end"]


def test_two_processes_claiming_one_rank_are_warned_about(isolated_home: Path, tmp_path: Path) -> None:
    """As when mp.spawn workers attach before init_process_group: both think they are rank 0."""
    body = ("p = gradwatch.attach(m, o, run='clash', world_size=2)\n"
            "p.wait_ready(); time.sleep(float(os.environ['HOLD']))\n"
            "p.close()\n")
    env = {"GRADWATCH_RUN_ID": "same-launch"}
    first = _run_script(tmp_path, body, env={**env, "HOLD": "60"}, wait=False)
    try:
        meta = isolated_home / "runs" / "clash" / "rank-0.meta.json"
        deadline = time.monotonic() + 60
        while not meta.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = _run_script(tmp_path, body, env={**env, "HOLD": "0"})
    finally:
        first.kill()
        first.wait()
    assert f"process {first.pid} also claims rank 0 of run clash" in second.stderr
    assert "after torch.distributed.init_process_group()" in second.stderr
