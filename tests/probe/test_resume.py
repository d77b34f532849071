"""The probe's state in the user's checkpoint: a process resumed from it continues the run (its name, its step
series) with the actions in force (LR cuts, clip statistics, scaled thresholds), and nothing decided for the
processes before it; and how a process ends (Ctrl-C, SIGTERM, sys.exit) decides how its run ends."""

from __future__ import annotations

import copy
import json
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.probes.runtime import ProcessRuntime
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.records import EndStatus
from tests.probe.helpers import read_run
from tests.probe.test_guards_and_commands import _model, _send, _step, _train_until


def _records(home: Path, run: str) -> list[dict[str, Any]]:
    return read_run(home, run)[1]


def _checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, probe: gradwatch.Probe) -> dict[str, Any]:
    """What a training script saves, through the JSON a Transformers checkpoint keeps the probe's state in."""
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "gradwatch": json.loads(json.dumps(probe.state_dict()))}


def _restore(saved: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, opt = _model()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    return model, opt


def test_a_resumed_probe_continues_the_run_and_its_step_series(isolated_home: Path) -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt)  # the default name: the script and a launch id
    for step in range(1, 11):
        _step(model, opt, step, probe=probe)
    saved = _checkpoint(model, opt, probe)
    for step in range(11, 16):  # lost: the process dies before its next checkpoint
        _step(model, opt, step, probe=probe)
    probe.close(status="interrupted")
    model, opt = _restore(saved)
    again = gradwatch.attach(model, opt, resume=saved["gradwatch"])
    for step in range(11, 21):
        _step(model, opt, step, probe=again)
    again.close()
    assert again.run == probe.run and again.step == 20
    assert [p.name for p in SpoolLayout(isolated_home).runs_dir.iterdir()] == [probe.run]
    records = _records(isolated_home, probe.run)
    kinds = [(r["kind"], r["step"]) for r in records if r["kind"] not in ("step", "activations")]
    assert kinds == [("checkpoint", 10), ("end", 15), ("resume", 10), ("end", 20)]
    # each process samples its first step's activations (an initialisation, or a resume that went wrong)
    assert [r["step"] for r in records if r["kind"] == "activations"] == [1, 11]
    resume = next(i for i, r in enumerate(records) if r["kind"] == "resume")
    checkpoint = next(r for r in records if r["kind"] == "checkpoint")
    assert records[resume]["checkpoint"] == saved["gradwatch"]["checkpoint"] == checkpoint["id"]
    assert [r["step"] for r in records[resume:] if r["kind"] == "step"] == list(range(11, 21))


def test_load_state_dict_before_the_first_step_resumes_and_after_it_is_ignored(
        isolated_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="first")
    _step(model, opt, 1, probe=probe)
    saved = _checkpoint(model, opt, probe)
    probe.close()
    model, opt = _restore(saved)
    again = gradwatch.attach(model, opt, run="ignored-name")  # the script attaches, then loads its checkpoint
    again.load_state_dict(saved["gradwatch"])
    _step(model, opt, 2, probe=again)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        again.load_state_dict(saved["gradwatch"])
    again.close()
    assert again.run == "first" and again.step == 2
    assert "load_state_dict() after the run's first step" in caplog.text
    assert not SpoolLayout(isolated_home).run_dir("ignored-name").exists()


def test_resume_from_a_step_continues_the_named_run(isolated_home: Path) -> None:
    model, opt = _model()
    with gradwatch.attach(model, opt, run="by-step") as probe:
        for step in range(1, 6):
            _step(model, opt, step, probe=probe)
    with gradwatch.attach(model, opt, run="by-step", resume=5) as again:
        _step(model, opt, 6, probe=again)
    records = _records(isolated_home, "by-step")
    assert [(r["kind"], r["step"], r.get("checkpoint")) for r in records if r["kind"] == "resume"] == \
        [("resume", 5, "")]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(("resume", "message"), [
    ({"model": {}}, "expects the dict probe.state_dict() returned"),
    ({"gradwatch": 1, "run": "x", "step": -1}, "expects the dict probe.state_dict() returned"),
    (12, "continues a run by its name: pass run="),
    ("ckpt.pt", "must be the dict probe.state_dict() returned or a step"),
])
def test_a_resume_value_that_is_not_a_saved_state_says_what_is_expected(resume: Any, message: str) -> None:
    model, opt = _model()
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        gradwatch.attach(model, opt, resume=resume)


def test_an_lr_cut_in_force_at_the_checkpoint_holds_after_the_resume(isolated_home: Path) -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="cut")
    _step(model, opt, 1, probe=probe)
    _send(probe, id="cut@1", action={"type": "reduce_lr", "factor": 0.5, "min_lr": 0.0, "eps": 1e-8})
    step = _train_until(lambda: probe.learning_rates()[0] != 0.01, model, opt, probe, 1)
    saved = _checkpoint(model, opt, probe)
    assert saved["opt"]["param_groups"][0]["lr"] == 0.01, "the optimizer's own state keeps the script's LR"
    probe.close()
    model, opt = _restore(saved)
    again = gradwatch.attach(model, opt, resume=saved["gradwatch"])
    assert again.learning_rates() == [0.005]
    _step(model, opt, step + 1, probe=again)
    again.close()
    last = [r for r in _records(isolated_home, "cut") if r["kind"] == "step"][-1]
    assert last["step"] == step + 1 and last["lr"] == [0.005], "the update after the resume used the cut LR"


@pytest.mark.parametrize("scheme", ["autoclip", "zclip", "fixed"])
def test_clip_statistics_survive_the_resume_exactly(isolated_home: Path, scheme: str) -> None:
    """A run resumed from step 30 clips steps 31..60 at the thresholds of a run never interrupted."""
    rules = {"guards": {"clip": {"scheme": scheme, "max_norm": 0.5 if scheme == "fixed" else None, "warmup": 10}}}

    def run(name: str, resume_at: int | None) -> list[tuple[int, float, bool]]:
        model, opt = _model()
        probe = gradwatch.attach(model, opt, run=name, rules=rules)
        saved = None
        for step in range(1, 61):
            _step(model, opt, step, probe=probe)
            if step == resume_at:
                saved = _checkpoint(model, opt, probe)
                break
        probe.close()
        if saved is not None:
            model, opt = _restore(saved)
            probe = gradwatch.attach(model, opt, rules=rules, resume=saved["gradwatch"])
            for step in range(resume_at + 1, 61):  # type: ignore[operator]
                _step(model, opt, step, probe=probe)
            probe.close()
        steps = [r for r in _records(isolated_home, name) if r["kind"] == "step"]
        return [(r["step"], r["clip"], r["clipped"]) for r in steps if r["step"] > 30][-30:]

    straight, resumed = run("straight", None), run("resumed", 30)
    assert resumed == straight
    assert len({clip for _, clip, _ in straight}) > 1 or scheme == "fixed"  # adaptive: the thresholds move


def test_commands_decided_for_the_processes_before_a_resume_are_not_applied(isolated_home: Path) -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="launches")
    _step(model, opt, 1, probe=probe)
    saved = _checkpoint(model, opt, probe)
    old_launch = probe.identity.launch_key
    probe.close()
    model, opt = _restore(saved)
    again = gradwatch.attach(model, opt, resume=saved["gradwatch"])
    _send(again, id="stale@1", launch=old_launch, action={"type": "reduce_lr", "factor": 0.5})
    _send(again, id="mine@1", launch=again.identity.launch_key, action={"type": "reduce_lr", "factor": 0.1})
    _train_until(lambda: again.learning_rates()[0] != 0.01, model, opt, again, 1)
    again.close()
    assert again.learning_rates()[0] == pytest.approx(0.001)
    assert [a["id"] for a in _records(isolated_home, "launches") if a["kind"] == "ack"] == ["mine@1"]


# -- how a process ends ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("exc", "exit_code", "interrupted_by", "expected"), [
    (None, None, None, (EndStatus.FINISHED, None, None)),
    (KeyboardInterrupt(), None, None, (EndStatus.INTERRUPTED, "KeyboardInterrupt", None)),
    (None, None, "SIGINT", (EndStatus.INTERRUPTED, "SIGINT", None)),  # Ctrl-C the script caught, then exited
    (SystemExit(1), None, "SIGINT", (EndStatus.INTERRUPTED, "SIGINT", None)),  # Lightning: Ctrl-C, then exit(1)
    (RuntimeError("x"), None, "SIGTERM", (EndStatus.INTERRUPTED, "SIGTERM", None)),
    (SystemExit(3), None, None, (EndStatus.FAILED, "exited with status 3", 3)),
    (SystemExit("usage: ..."), None, None, (EndStatus.FAILED, "exited with status 1", 1)),
    (SystemExit(0), None, None, (EndStatus.FINISHED, None, None)),
    (None, 4, None, (EndStatus.FAILED, "exited with status 4", 4)),  # sys.exit(4), seen at exit
    (None, 0, None, (EndStatus.FINISHED, None, None)),
    (RuntimeError("boom"), None, None, (EndStatus.FAILED, "RuntimeError('boom')", None)),
    (gradwatch.StopTraining("rule x"), None, None, (EndStatus.STOPPED, "rule x", None)),
])
def test_how_a_process_ends_decides_how_its_run_ends(exc: BaseException | None, exit_code: int | None,
                                                     interrupted_by: str | None, expected: tuple[Any, ...]) -> None:
    runtime = ProcessRuntime()
    runtime.exit_code, runtime.interrupted_by, runtime.interrupted_at = exit_code, interrupted_by, 10.0
    assert runtime.ending(exc, opened_at=5.0, at_exit=True) == expected
    if exc is None and exit_code:  # a probe closed before the process exits: a sys.exit the script caught is not its
        assert runtime.ending(exc, opened_at=5.0) == (EndStatus.FINISHED, None, None)
    if interrupted_by and not isinstance(exc, KeyboardInterrupt):  # a probe opened after the signal: not its
        assert runtime.ending(exc, opened_at=20.0)[0] is not EndStatus.INTERRUPTED


SCRIPT = """
import os, signal, sys, torch, gradwatch
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
probe = gradwatch.attach(model, opt, run="ending")
for step in range(1, 1000):
    opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
    if step == 10:
        {action}
probe.close()
"""


@pytest.mark.parametrize(("action", "returncode", "status", "exit_code"), [
    ("sys.exit(3)", 3, "failed", 3),
    ("sys.exit(0)", 0, "finished", None),
    ("os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM, "interrupted", None),
    ("os.kill(os.getpid(), signal.SIGINT)", -signal.SIGINT, "interrupted", None),
    ("raise ValueError('bad batch')", 1, "failed", None),
])
def test_a_script_that_exits_is_recorded_as_it_ended(isolated_home: Path, action: str, returncode: int, status: str,
                                                    exit_code: int | None) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT.replace("{action}", action)], capture_output=True,
                          timeout=120)
    assert done.returncode == returncode, done.stderr.decode()
    [end] = [r for r in _records(isolated_home, "ending") if r["kind"] == "end"]
    assert (end["step"], end["status"], end.get("exit_code")) == (10, status, exit_code)


def test_a_sigterm_handler_of_the_script_stays_in_charge(isolated_home: Path) -> None:
    """A script (or framework) with its own SIGTERM handler keeps it: gradwatch installs none over it."""
    script = SCRIPT.replace("import os, signal, sys, torch, gradwatch",
                            "import os, signal, sys, torch, gradwatch\n"
                            "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))  # finish cleanly")
    done = subprocess.run([sys.executable, "-c", script.replace("{action}", "os.kill(os.getpid(), signal.SIGTERM)")],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    [end] = [r for r in _records(isolated_home, "ending") if r["kind"] == "end"]
    assert end["status"] == "finished"

