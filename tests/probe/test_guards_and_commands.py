"""In-probe guards (skip, clip) and the agent's commands, carried out on a real training loop.

Commands are written to the run's control file by the test itself (the agent's part is tested
in tests/integration/test_rules_actions.py): this isolates what the probe does with them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.spool.format import SpoolLayout
from tests.probe.helpers import read_run


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 8, generator=gen)
    return x, x.sum(dim=1, keepdim=True)


def _model(optimizer: str = "sgd") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    factories = {"sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
                 "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
                 "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1)}
    return model, factories[optimizer](model.parameters())


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, nan: bool = False,
          probe: Any = None) -> torch.Tensor:
    x, y = _data(step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    if nan:
        loss = loss * float("nan")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if probe is not None:
        probe.log(loss=loss)
    return loss


def _records(probe: gradwatch.Probe) -> list[dict[str, Any]]:
    return read_run(Path(probe.layout.home), probe.run)[1]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_nonfinite_gradients_skip_the_update_exactly(optimizer: str) -> None:
    """A skipped step leaves parameters, moments, weight decay and step counts as if it never ran."""
    reference_model, reference_opt = _model(optimizer)
    model, opt = _model(optimizer)
    probe = gradwatch.attach(model, opt, run="skip")  # the default guards skip non-finite steps
    for step in range(1, 21):
        if step == 10:
            _step(model, opt, step, nan=True, probe=probe)  # the reference simply has no step 10
            continue
        _step(reference_model, reference_opt, step)
        _step(model, opt, step, probe=probe)
    probe.close()
    for ours, theirs in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    assert str(opt.state_dict()["state"]) == str(reference_opt.state_dict()["state"])
    records = [r for r in _records(probe) if r["kind"] == "step"]
    assert [r["step"] for r in records if r.get("skip")] == [10]
    assert records[9]["skip"] == "nonfinite" and math.isnan(records[9]["grad_norm"])
    assert all(p.grad is not None for p in model.parameters()), "gradients are given back after the step"


def test_without_the_guard_a_nan_step_poisons_the_weights() -> None:
    """The control experiment: with the skip guard off the same step makes the weights NaN."""
    model, opt = _model("sgd")
    probe = gradwatch.attach(model, opt, run="noskip", rules={"guards": {"skip": {"on_nonfinite": "off"}}})
    _step(model, opt, 1, nan=True, probe=probe)
    probe.close()
    assert torch.isnan(next(model.parameters())).all()


def test_observe_mode_records_the_skip_it_would_have_made() -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="observe", rules={"guards": {"skip": {"on_nonfinite": "observe"}}})
    _step(model, opt, 1, nan=True, probe=probe)
    probe.close()
    step = next(r for r in _records(probe) if r["kind"] == "step")
    assert step.get("would_skip") == "nonfinite" and "skip" not in step


def test_fixed_clipping_equals_clip_grad_norm() -> None:
    reference_model, reference_opt = _model()
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="clip", rules={"guards": {"clip": {"scheme": "fixed", "max_norm": 0.5}}})
    for step in range(1, 31):
        x, y = _data(step)
        loss = torch.nn.functional.mse_loss(reference_model(x), y)
        reference_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 0.5)
        reference_opt.step()
        _step(model, opt, step, probe=probe)
    probe.close()
    for ours, theirs in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    steps = [r for r in _records(probe) if r["kind"] == "step"]
    assert all(r["clip"] == 0.5 for r in steps)
    assert [r["clipped"] for r in steps] == [r["grad_norm"] > 0.5 for r in steps]
    assert any(r["clipped"] for r in steps)


@pytest.mark.parametrize("scheme", ["autoclip", "zclip"])
def test_adaptive_clipping_records_its_threshold_and_bounds_a_spike(scheme: str) -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run=scheme, rules={"guards": {"clip": {"scheme": scheme, "max_norm": None}}})
    for step in range(1, 61):
        x, y = _data(step)
        loss = torch.nn.functional.mse_loss(model(x), y) * (1000.0 if step == 50 else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.close()
    steps = {r["step"]: r for r in _records(probe) if r["kind"] == "step"}
    spike = steps[50]
    assert spike["clipped"] and spike["clip"] < spike["grad_norm"] / 100, "the 1000x step was clipped hard"
    assert steps[51]["clip"] < 10 * steps[49]["clip"], "the spike did not drag the threshold up"


# -- commands ---------------------------------------------------------------------------------------
def _send(probe: gradwatch.Probe, **command: Any) -> None:
    probe.wait_ready()
    assert probe.run_dir is not None
    path = SpoolLayout.commands_file(probe.run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = {"rule": "test", "reason": "test", "trigger_step": probe.step, "apply_at_step": None, **command}
    with open(path, "a") as f:
        f.write(json.dumps(command) + "\n")


def _train_until(predicate: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, probe: gradwatch.Probe,
                 start: int, limit: int = 400) -> int:
    step = start
    while not predicate():
        step += 1
        assert step < start + limit, "the command was never applied"
        _step(model, opt, step, probe=probe)
        time.sleep(0.005)
    return step


def _handled(probe: gradwatch.Probe, *ids: str) -> Any:
    """A predicate: the probe has read the commands ``ids`` and none of them is still waiting."""
    def predicate() -> bool:
        reader = probe._writer.session.commands
        return (reader is not None and set(ids) <= reader.seen
                and not any(command.id in ids for command in list(probe._commands.inbox)))
    return predicate


def _acks(probe: gradwatch.Probe) -> list[dict[str, Any]]:
    probe.close()
    return [r for r in _records(probe) if r["kind"] == "ack"]


def test_reduce_lr_command_is_applied_once_and_acknowledged() -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="lr")
    for step in range(1, 4):
        _step(model, opt, step, probe=probe)
    _send(probe, id="cut@3", action={"type": "reduce_lr", "factor": 0.5, "min_lr": 0.004, "eps": 1e-8})
    _send(probe, id="cut@3", action={"type": "reduce_lr", "factor": 0.5})  # a duplicate id: ignored
    step = _train_until(lambda: probe.learning_rates()[0] != 0.01, model, opt, probe, 3)
    assert opt.param_groups[0]["lr"] == 0.01, "between updates the group keeps the script's LR"
    _send(probe, id="cut@x", action={"type": "reduce_lr", "factor": 0.1, "min_lr": 0.004, "eps": 1e-8})
    step = _train_until(_handled(probe, "cut@x"), model, opt, probe, step)
    _send(probe, id="cut@y", action={"type": "reduce_lr", "factor": 0.1, "min_lr": 0.004})  # at min_lr already
    _train_until(_handled(probe, "cut@y"), model, opt, probe, step)
    _step(model, opt, 999, probe=probe)
    acks = _acks(probe)
    assert [(a["id"], a["status"], a["action"]) for a in acks] == [("cut@3", "applied", "reduce_lr"),
                                                                  ("cut@x", "applied", "reduce_lr"),
                                                                  ("cut@y", "not_taken", "reduce_lr")]
    assert acks[0]["detail"] == "lr 0.01->0.005" and acks[1]["detail"] == "lr 0.005->0.004"  # bounded by min_lr
    assert "at min_lr already" in acks[2]["detail"]
    steps = [r for r in _records(probe) if r["kind"] == "step"]
    assert {r["lr"][0] for r in steps if r["step"] > acks[1]["step"]} == {0.004}, "the step records hold the cut LR"


def test_a_command_with_apply_at_step_waits_for_that_step() -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="at")
    _step(model, opt, 1, probe=probe)
    _send(probe, id="later", action={"type": "reduce_lr", "factor": 0.5}, apply_at_step=40)
    lrs = {}
    for step in range(2, 50):
        _step(model, opt, step, probe=probe)
        lrs[step] = probe.learning_rates()[0]
        time.sleep(0.005)
    acks = _acks(probe)
    assert lrs[39] == 0.01 and lrs[40] == 0.005, "applied right after step 40, not before"
    assert [(a["step"], a["status"], a["apply_at_step"]) for a in acks] == [(40, "applied", 40)]


def test_stop_sets_should_stop_and_raise_mode_raises_stop_training() -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="stop")
    _step(model, opt, 1, probe=probe)
    _send(probe, id="stop@1", action={"type": "stop"}, reason="patience_exhausted", rule="early-stop")
    _train_until(lambda: probe.should_stop, model, opt, probe, 1)
    assert probe.stop_reason == "rule early-stop: patience_exhausted (step 1)"
    assert _acks(probe)[0]["status"] == "applied"
    end = _records(probe)[-1]
    assert (end["kind"], end["status"], end["error"]) == ("end", "stopped", probe.stop_reason)

    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="stop-raise", on_stop="raise")
    _step(model, opt, 1, probe=probe)
    _send(probe, id="stop@1", action={"type": "stop"})
    with pytest.raises(gradwatch.StopTraining, match="gradwatch stopped the run"), probe:
        _train_until(lambda: False, model, opt, probe, 1)
    records = _records(probe)
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "stopped"


def test_a_stop_the_script_ignores_is_acknowledged_as_not_taken() -> None:
    """A stop is taken when no step follows it; a script that never reads should_stop (or catches
    StopTraining) and goes on gets a not_taken acknowledgement saying so."""
    for on_stop in ("flag", "raise"):
        model, opt = _model()
        probe = gradwatch.attach(model, opt, run=f"ignored-{on_stop}", on_stop=on_stop)
        _step(model, opt, 1, probe=probe)
        _send(probe, id="stop@1", action={"type": "stop"})
        step = 1
        while not probe.should_stop:
            step += 1
            assert step < 400, "the stop never arrived"
            with contextlib.suppress(gradwatch.StopTraining):  # caught, and the loop goes on
                _step(model, opt, step, probe=probe)
            time.sleep(0.005)
        _step(model, opt, step + 1, probe=probe)  # one more step after the stop
        [ack] = _acks(probe)
        assert ack["status"] == "not_taken", ack
        assert ("caught gradwatch.StopTraining" if on_stop == "raise" else "does not read probe.should_stop") \
            in ack["detail"]


def test_rewind_restores_the_snapshot_before_the_trigger_and_skips_updates() -> None:
    model, opt = _model("adam")
    probe = gradwatch.attach(model, opt, run="rewind", rules={"guards": {"snapshots": {"every": 10, "keep": 2,
                                                                                      "enabled": True}}})
    snapshot_params: dict[int, list[torch.Tensor]] = {}
    for step in range(1, 26):
        _step(model, opt, step, probe=probe)
        if step % 10 == 0:
            snapshot_params[step] = [p.detach().clone() for p in model.parameters()]
    saved_state = copy.deepcopy(opt.state_dict())
    _send(probe, id="rw@25", action={"type": "rewind", "skip_steps": 3, "min_back_steps": 5}, trigger_step=25)
    restored_at = _train_until(_handled(probe, "rw@25"), model, opt, probe, 25)
    for ours, snap in zip(model.parameters(), snapshot_params[20], strict=True):
        assert torch.equal(ours, snap), "parameters are those of the snapshot of step 20"
    assert int(opt.state_dict()["state"][0]["step"]) == 20 != int(saved_state["state"][0]["step"])
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(restored_at + 1, restored_at + 4):
        _step(model, opt, step, probe=probe)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True)), "3 updates skipped"
    _step(model, opt, restored_at + 4, probe=probe)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    acks = _acks(probe)
    assert acks[0]["status"] == "applied" and "snapshot of step 20" in acks[0]["detail"]
    skipped = [r["step"] for r in _records(probe) if r.get("skip") == "rewind"]
    assert skipped == [restored_at + 1, restored_at + 2, restored_at + 3]


def test_commands_that_cannot_be_carried_out_are_refused_and_change_nothing() -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="refuse")
    _step(model, opt, 1, probe=probe)
    _send(probe, id="rw", action={"type": "rewind", "skip_steps": 0})  # no snapshots are taken
    _send(probe, id="sc", action={"type": "scale_clip", "factor": 2.0})  # clip scheme is none
    _train_until(_handled(probe, "rw", "sc"), model, opt, probe, 1)
    acks = _acks(probe)
    assert [(a["id"], a["status"]) for a in acks] == [("rw", "rejected"), ("sc", "rejected")]
    assert "snapshots" in acks[0]["detail"] and "nothing clips" in acks[1]["detail"]


def test_a_restarted_probe_in_the_same_run_does_not_apply_a_command_twice(monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("GRADWATCH_RUN_ID", "same-launch")
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="restart")
    _step(model, opt, 1, probe=probe)
    _send(probe, id="once", action={"type": "reduce_lr", "factor": 0.5})
    _train_until(lambda: probe.learning_rates()[0] == 0.005, model, opt, probe, 1)
    probe.close()
    with open(SpoolLayout.commands_file(probe.run_dir), "a") as f:  # type: ignore[arg-type]
        f.write("{not json\n")
    model, opt = _model()
    again = gradwatch.attach(model, opt, run="restart")
    assert again.run == "restart"
    _send(again, id="twice", action={"type": "reduce_lr", "factor": 0.1})
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        _train_until(lambda: again.learning_rates()[0] != 0.01, model, opt, again, 1)
    assert again.learning_rates()[0] == pytest.approx(0.001), "'once' was not applied again, 'twice' was"
    again.close()
    acks = [r for r in _records(again) if r["kind"] == "ack"]
    assert [a["id"] for a in acks] == ["once", "twice"]
    assert "ignored an invalid command" in caplog.text


def test_an_extreme_gradient_spike_skips_that_update_when_the_spike_guard_acts() -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="spike-skip",
                             rules={"guards": {"skip": {"on_spike": "act", "spike_warmup": 20}}})
    for step in range(1, 41):
        x, y = _data(step)
        loss = torch.nn.functional.mse_loss(model(x), y) * (1e4 if step == 30 else 1.0)
        opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step == 30:
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    probe.close()
    assert [r["step"] for r in _records(probe) if r.get("skip")] == [30]


def test_scale_clip_raises_and_lowers_the_fixed_threshold_within_its_bounds() -> None:
    model, opt = _model()
    probe = gradwatch.attach(model, opt, run="scale-clip",
                             rules={"guards": {"clip": {"scheme": "fixed", "max_norm": 1.0}}})
    _step(model, opt, 1, probe=probe)
    _send(probe, id="up", action={"type": "scale_clip", "factor": 4.0, "max_max_norm": 3.0})
    _send(probe, id="down", action={"type": "scale_clip", "factor": 0.1})
    _train_until(_handled(probe, "up", "down"), model, opt, probe, 1)
    _step(model, opt, 100, probe=probe)
    acks = _acks(probe)
    assert [(a["status"], a["detail"]) for a in acks] == [
        ("applied", "clip threshold now 3 (then scaled again by down)"),
        ("applied", "clip threshold now 0.3 (the next clip used it)")]
    assert [r for r in _records(probe) if r["kind"] == "step"][-1]["clip"] == pytest.approx(0.3)


def test_an_lr_cut_holds_through_a_rewind_applied_after_it() -> None:
    """A rewind loads the optimizer's snapshot (new param-group dicts): the LR cut applied just before it holds."""
    model, opt = _model()
    snapshots = {"enabled": True, "every": 2, "keep": 16}
    probe = gradwatch.attach(model, opt, run="cut-then-rewind", rules={"guards": {"snapshots": snapshots}})
    for step in range(1, 5):
        _step(model, opt, step, probe=probe)
    _send(probe, id="cut@4", action={"type": "reduce_lr", "factor": 0.5, "min_lr": 0.0, "eps": 1e-8})
    _send(probe, id="rewind@4", action={"type": "rewind", "skip_steps": 0, "min_back_steps": 1})
    _train_until(_handled(probe, "cut@4", "rewind@4"), model, opt, probe, 4)
    assert probe.learning_rates() == [0.005]
    acks = _acks(probe)
    assert sorted((a["id"], a["status"]) for a in acks) == [("cut@4", "applied"), ("rewind@4", "applied")], acks
