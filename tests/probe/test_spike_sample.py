"""The on-trigger layer sample: at the steps the agent counts as spikes, and only there, the probe records every
layer's gradient norm of that very step (probes/spike_sample.py). Real training; the agent's own ingest counts the
spikes."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

import gradwatch
from gradwatch.agent.alerts import AlertTracker
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.rules import AgentRules
from gradwatch.agent.state import AgentState
from gradwatch.rules.config import parse_rules
from gradwatch.rules.ema import EmaZScore
from gradwatch.spool.format import SpoolLayout
from tests.agent.helpers import FakeClock

BAD_BATCHES = (60, 130)


def _train(home: Path, run: str, *, script_clips: bool = False) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    teacher = torch.randn(8, 1)
    with gradwatch.attach(model, opt, run=run, home=home, autostart_agent=False, layer_stats_every=50) as probe:
        for step in range(1, 181):
            x = torch.randn(32, 8)
            y = x @ teacher
            if step in BAD_BATCHES:
                y = y * 40  # mislabelled batch: the loss and every gradient jump
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if script_clips:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)
            opt.step()
            probe.log(loss=loss)


def test_the_probe_samples_the_layers_at_each_step_the_agent_counts_as_a_spike(tmp_path: Path) -> None:
    _train(tmp_path, "bad-batches")
    rank = gradwatch.read_run("bad-batches", tmp_path).rank(0)
    triggered = [r for r in rank.layers if r.trigger]
    assert [r.step for r in triggered] == list(BAD_BATCHES)
    assert all(r.layers == ["0", "2", "4"] and None not in r.grad_norm for r in triggered)
    # the agent's statistic over the same values flags those steps (and any follower within the gap)
    loss, norm = EmaZScore(), EmaZScore()
    flagged = {s.step for s in rank.steps if norm.update(s.grad_norm or 0.0) | loss.update((s.values or {})["loss"])}
    assert set(BAD_BATCHES) <= flagged and all(any(0 <= s - b < 10 for b in BAD_BATCHES) for s in flagged)
    # and the agent, ingesting the run, counted spikes there: the same statistic, the same values, the same order
    state = AgentState(spike_window=60.0)
    SpoolIngestor(SpoolLayout(tmp_path), state, FakeClock(1e9)).scan_all()
    counted = state.runs["bad-batches"][0].spikes
    assert counted["loss"] + counted["grad_norm"] >= len(BAD_BATCHES)
    # each sample's norms are that step's: their root sum of squares is the step's global gradient norm
    by_step = {s.step: s.grad_norm for s in rank.steps}
    for r in triggered:
        total = sum(v * v for v in r.grad_norm if v is not None) ** 0.5
        assert abs(total - by_step[r.step]) <= 1e-4 * by_step[r.step]


def test_no_sample_when_the_scripts_own_clip_gives_the_norm(tmp_path: Path) -> None:
    """clip_grad_norm_ computes its per-tensor norms inside torch: there is nothing to sample at no cost, so only
    the periodic samples are there (docs/debugging.md says so)."""
    _train(tmp_path, "script-clip", script_clips=True)
    layers = gradwatch.read_run("script-clip", tmp_path).rank(0).layers
    assert [r.step for r in layers] == [50, 100, 150] and not any(r.trigger for r in layers)


SPIKE_RULE = """
rules:
  - name: grad-norm-explosion
    metric: grad_norm
    detect: {type: spike}
    action: {type: reduce_lr, factor: 0.5}
    mode: observe
"""


def test_the_spike_alert_and_run_summary_name_the_layers_that_moved(tmp_path: Path) -> None:
    _train(tmp_path, "bad-batches")
    clock = FakeClock(time.time())
    state = AgentState(spike_window=60.0, rules=AgentRules(parse_rules(SPIKE_RULE, "rules.yaml"), None))
    SpoolIngestor(SpoolLayout(tmp_path), state, clock).scan_all()
    [run] = state.summary(clock())
    samples = run["ranks"][0]["spike_samples"]
    assert [s["step"] for s in samples] == list(BAD_BATCHES)
    # three layers, each against the periodic sample before it (steps 50 and 100), the most moved first
    factors = [float(f) for f in re.findall(r"\(([\d.e+]+)x its last sample\)", samples[0]["text"])]
    assert samples[0]["text"].startswith("step 60: layer gradient norms at the ") and len(factors) == 3
    assert factors == sorted(factors, reverse=True) and factors[0] > 3
    [alert] = [a for a in AlertTracker(resolve_after=1e9).evaluate(state, clock())
               if a.name == "GradwatchGradNormExplosion"]
    # its last trigger is a follower of the second bad batch (within the gap): the stretch's sample is named
    assert 130 <= int(alert.annotations["step"]) < 140 and alert.annotations["layers"] == samples[-1]["text"]
