"""``gradwatch inspect`` on runs recorded here, one of each kind: each gets its finding with the right steps, and
the healthy run gets none. Real training loops; only the exploding-layer check reads a spool written by hand (a
layer whose gradient grows 100x alone, a shape hard to make on purpose in a few steps)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.cli import main
from gradwatch.diagnosis import Finding, diagnose
from gradwatch.forensics import spike_forensics
from gradwatch.history import RankHistory
from gradwatch.spool.records import LayersRecord, RunMeta, StepRecord
from tests.agent.helpers import SpoolBuilder
from tests.probe.test_nonfinite_origin import ForwardNaN

STEPS = 160


def _record(home: Path, run: str, *, lr: float = 0.01, lr_jump_at: int = 0, nan_at: int = 0, frozen_after: int = 0,
            data_wait: float = 0.0, clip: float | None = None, depth: int = 3, activation: Any = torch.nn.ReLU,
            dead: bool = False, batch_size: bool = False) -> list[Finding]:
    """Regression onto an exact linear teacher (the loss keeps falling: no noise floor), layer statistics every 5
    steps; the knobs plant one problem each."""
    torch.manual_seed(0)
    width = 64
    faulty = ForwardNaN() if nan_at else None
    layers: list[torch.nn.Module] = [torch.nn.Linear(16, width), activation()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), activation()]
    if faulty is not None:
        faulty.lin = torch.nn.Linear(width, width)
        layers += [faulty]
    layers += [torch.nn.Linear(width, 1)]
    model = torch.nn.Sequential(*layers)
    if dead:
        with torch.no_grad():
            model[0].bias.fill_(-100.0)  # its ReLU never fires: nothing flows back into layer 0
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    teacher = torch.randn(16, 1)
    fixed = torch.randn(64, 16)
    rules = {"guards": {"clip": {"scheme": "fixed", "max_norm": clip}}} if clip else None
    with gradwatch.attach(model, opt, run=run, home=home, autostart_agent=False, layer_stats_every=5,
                          rules=rules) as probe:
        for step in range(1, STEPS + 1):
            if data_wait:
                time.sleep(data_wait)  # the data loader's time, before the forward pass
            x = fixed if frozen_after else torch.randn(64, 16)
            if faulty is not None:
                faulty.broken = step == nan_at
            for group in opt.param_groups:
                group["lr"] = lr * 200 if step == lr_jump_at else 0.0 if frozen_after and step > frozen_after else lr
            loss = torch.nn.functional.mse_loss(model(x), x @ teacher)
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss, **({"batch_size": len(x)} if batch_size else {}))
    return diagnose(gradwatch.read_run(run, home))


def _kinds(findings: list[Finding]) -> list[str]:
    return [f.kind for f in findings]


def test_a_healthy_run_has_nothing_to_say(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _record(tmp_path, "healthy") == []
    main(["inspect", "healthy", "--home", str(tmp_path)])
    assert "nothing stands out" in capsys.readouterr().out
    # and the probe saw no spike: no on-trigger layer sample, only the periodic ones
    layers = gradwatch.read_run("healthy", tmp_path).rank(0).layers
    assert [r.step for r in layers] == list(range(5, STEPS + 1, 5)) and not any(r.trigger for r in layers)


def test_a_spike_is_found_at_its_step_with_the_lr_there(tmp_path: Path) -> None:
    findings = _record(tmp_path, "spike", lr_jump_at=100)
    spikes = [f for f in findings if f.kind == "spike"]
    assert spikes and all(f.steps.startswith(("step 10", "steps 10")) for f in spikes)
    assert any("after a learning rate of 2 at step 100; 0.01 at the spike" in f.what for f in spikes)


def test_a_spike_says_what_moved_first_and_by_how_much_with_the_lr_and_batch_there(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The LR jumps 200x for the update of step 100 (a periodic sample: update/weight ratios measured); the loss
    and gradients spike at step 101, a step no periodic sample falls on: the probe's on-trigger sample has it."""
    findings = _record(tmp_path, "spike", lr_jump_at=100, batch_size=True)
    layers = gradwatch.read_run("spike", tmp_path).rank(0).layers
    [triggered] = [r for r in layers if r.trigger]
    assert triggered.step == 101 and triggered.trigger.startswith("spike:") and triggered.layers == ["0", "2", "4"]
    assert all(norm is not None and norm > 0 for norm in triggered.grad_norm) and triggered.update_ratio == {}
    [loss_spike] = [f for f in findings if f.kind == "spike" and f.what.startswith("loss")]
    at, first, then = loss_spike.details
    assert at == "at step 101: learning rate 0.01, batch size 64"
    assert first.startswith("moved first, at step 100: `0` update/weight ratio up to ")  # the first layer most
    assert then.startswith("then at step 101: ") and "gradient norm up to" in then and "update" not in then
    moved = {m.group(1): float(m.group(2)) for m in re.finditer(r"`(\w+)` update/weight ratio up to ([\d.]+)x", first)}
    assert set(moved) >= {"0", "2"} and all(factor > 3 for factor in moved.values())
    main(["inspect", "spike", "--home", str(tmp_path)])
    out = capsys.readouterr().out
    assert "\n         moved first, at step 100: `0` update/weight ratio" in out


def test_a_layer_moves_when_it_is_over_three_times_its_usual_not_at_three() -> None:
    meta = RunMeta(run="r", rank=0, world_size=1)
    periodic = [LayersRecord(step=s, t=float(s), layers=["a", "b"], grad_norm=[1.0, 1.0]) for s in range(10, 101, 10)]
    records: list[Any] = [StepRecord(step=s, t=float(s), lr=[0.1], values={"loss": 1.0}) for s in range(1, 181)]
    records += periodic + [LayersRecord(step=160, t=160.0, layers=["a", "b"], grad_norm=[3.0, 3.0000001]),
                           LayersRecord(step=170, t=170.0, layers=["a", "b"], grad_norm=[3.0, 8.0], trigger="spike:loss")]
    rank = RankHistory(0, meta, records)
    evidence = spike_forensics(rank, 170, "loss")
    assert [(m.layer, m.step, m.factor) for m in evidence.moves] == [("b", 160, 8.0)]  # `a` at exactly 3x: no
    assert evidence.sampled and evidence.lr == [0.1] and evidence.batch_size is None
    assert evidence.lines()[0] == "at step 170: learning rate 0.1"
    early = spike_forensics(rank, 5, "loss")  # nothing sampled before it
    assert early.moves == [] and "no layer sample" in early.lines()[-1]
    flat = RankHistory(0, meta, [*records[:180], *periodic,
                                 LayersRecord(step=170, t=170.0, layers=["a", "b"], grad_norm=[2.9, 1.0],
                                              trigger="spike:loss")])
    whole = spike_forensics(flat, 170, "loss")  # sampled, nothing over 3x: the whole model moved, not one layer
    assert whole.moves == [] and whole.lines()[-1].startswith("no layer moved over 3x its usual in the 1 sample(s)")


def test_a_nan_says_where_it_came_from(tmp_path: Path) -> None:
    findings = _record(tmp_path, "nan", nan_at=90)
    [nonfinite] = [f for f in findings if f.kind == "nonfinite"]
    assert nonfinite.severity == "problem" and nonfinite.steps == "step 90"
    assert "step 90: gradients non-finite (nan)" in nonfinite.what


def test_a_plateau_is_a_note_with_its_steps(tmp_path: Path) -> None:
    findings = _record(tmp_path, "plateau", frozen_after=60)
    [plateau] = [f for f in findings if f.kind == "plateau"]
    assert plateau.severity == "note" and plateau.steps.startswith("steps 96-160")


def test_an_input_bound_loop_is_told_to_load_faster(tmp_path: Path) -> None:
    findings = _record(tmp_path, "slow-data", data_wait=0.01)
    [slow] = [f for f in findings if f.kind == "input_bound"]
    assert "num_workers" in slow.advice


def test_a_clip_that_clips_every_step(tmp_path: Path) -> None:
    findings = _record(tmp_path, "clipped", clip=1e-4)
    [clipping] = [f for f in findings if f.kind == "clipping"]
    assert "clipped 100% of the steps" in clipping.what


def test_a_dead_layer(tmp_path: Path) -> None:
    findings = _record(tmp_path, "dead", dead=True)
    [dead] = [f for f in findings if f.kind == "dead_layer"]
    assert "`0`" in dead.what


def test_vanishing_gradients_in_a_deep_sigmoid_net(tmp_path: Path) -> None:
    findings = _record(tmp_path, "deep", depth=12, activation=torch.nn.Sigmoid)
    [vanishing] = [f for f in findings if f.kind == "vanishing_gradients"]
    assert "`0` gets" in vanishing.what and "`22`" in vanishing.what


def test_an_exploding_layer(tmp_path: Path) -> None:
    spool = SpoolBuilder(tmp_path)
    spool.start("exploding")
    spool.steps("exploding", 0, 1, 60)
    for step in range(5, 61, 5):
        spool.append("exploding", 0, LayersRecord(step=step, t=1_000_000.0 + step / 10, layers=["a", "b", "c", "d"],
                                                  grad_norm=[0.1 * 1.7 ** step / 1.7**5, 0.1, 0.1, 0.1]))
    [exploding] = [f for f in diagnose(gradwatch.read_run("exploding", tmp_path)) if f.kind == "exploding_layer"]
    assert "`a`" in exploding.what and exploding.severity == "problem"


def test_the_json_output_lists_the_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(tmp_path, "clipped", clip=1e-4)
    main(["inspect", "clipped", "--home", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["run"] == "clipped" and "clipping" in [f["kind"] for f in out["findings"]]
