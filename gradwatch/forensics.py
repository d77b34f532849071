"""Spike forensics: at a loss or gradient spike, which layers moved first and by how much, and the LR and batch.

Deciding only, from a run's history (gradwatch.history). The evidence is the per-layer samples: the periodic ones
(``layer_stats_every``: gradient norms of every layer, update/weight ratios of a rotating few) and the on-trigger
sample the probe takes at the very step that spiked (gradient norms of every layer, probes/spike_sample.py).

A layer *moved* at a sampled step when its value there is over ``MOVE_FACTOR`` times its baseline, the median of
its values at the ``BASELINE_SAMPLES`` periodic samples before the spike (a median: a rise in the last few of them
does not hide itself). A layer moved *first* when it did so at an earlier sample than the others; at the spike
itself, the layers that moved are ranked by how much. Update/weight ratios come from periodic samples only (an
update needs a copy of the weights from before it), so they tell what moved in the run-up, gradients at the spike.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from gradwatch.history import RankHistory
from gradwatch.spool.records import LayersRecord, StepRecord

MOVE_FACTOR = 3.0
BASELINE_SAMPLES = 10
RUN_UP_STEPS = 50  # samples this close before the spike are its run-up
SHOWN = 5


@dataclass(frozen=True)
class LayerMove:
    layer: str
    statistic: str  # "grad_norm" | "update_ratio"
    step: int  # the first sampled step at which it was over MOVE_FACTOR x its baseline
    baseline: float
    value: float  # its highest from that step to the spike
    factor: float  # value / baseline

    def text(self) -> str:
        what = "gradient norm" if self.statistic == "grad_norm" else "update/weight ratio"
        return f"`{self.layer}` {what} up to {self.factor:.3g}x its usual ({self.baseline:.3g} -> {self.value:.3g})"


@dataclass(frozen=True)
class SpikeForensics:
    step: int
    quantity: str  # "loss" | "gradient norm"
    lr: list[float] = field(default_factory=list)
    batch_size: float | None = None
    sampled: bool = False  # the layers were sampled at the spike itself (the probe's on-trigger sample)
    samples: int = 0  # layer samples looked at: the run-up's and the spike's
    moves: list[LayerMove] = field(default_factory=list)  # first-moving first, then by how much

    def lines(self) -> list[str]:
        """What people read under a spike finding."""
        setting = [f"learning rate {', '.join(f'{lr:.3g}' for lr in self.lr)}" if self.lr else "",
                   f"batch size {self.batch_size:g}" if self.batch_size is not None else ""]
        out = [f"at step {self.step}: " + (", ".join(s for s in setting if s) or "no learning rate or batch size "
                                                                                 "recorded")]
        steps = sorted({m.step for m in self.moves})
        for i, at in enumerate(steps):
            lead = f"moved first, at step {at}: " if i == 0 else f"then at step {at}: "
            out.append(lead + "; ".join(m.text() for m in self.moves if m.step == at))
        if not steps and self.samples:
            out.append(f"no layer moved over {MOVE_FACTOR:g}x its usual in the {self.samples} sample(s) up to it: the "
                       "whole model did (a bad batch, or the LR)")
        elif not steps:
            out.append("no layer sample at or just before the spike (layer_stats_every; the on-trigger sample needs "
                       "gradwatch to compute the gradient norm, not the script's clip_grad_norm_)")
        return out


def spike_forensics(rank: RankHistory, step: int, quantity: str) -> SpikeForensics:
    record = next((s for s in rank.steps if s.step == step), None)
    lr = list(record.lr) if record is not None else []
    batch = _batch_size(record)
    samples = [r for r in rank.layers if r.step <= step]
    periodic = [r for r in samples if not r.trigger]
    at_spike = next((r for r in reversed(samples) if r.step == step), None)
    run_up = [r for r in periodic if step - RUN_UP_STEPS < r.step < step]
    base = [r for r in periodic if r.step <= step - RUN_UP_STEPS][-BASELINE_SAMPLES:] or \
        [r for r in periodic if r not in run_up][-BASELINE_SAMPLES:]
    if not base and len(run_up) > 1:  # a spike early in the run: its first samples are all the baseline there is
        base, run_up = run_up[:1], run_up[1:]
    watched = run_up + ([at_spike] if at_spike is not None and at_spike not in run_up else [])
    moves = (_moves(base, watched, "grad_norm") + _moves(base, [r for r in watched if not r.trigger],
                                                          "update_ratio")) if base else []
    moves.sort(key=lambda m: (m.step, -m.factor))
    return SpikeForensics(step=step, quantity=quantity, lr=lr, batch_size=batch, sampled=at_spike is not None,
                          samples=len(watched) if base else 0, moves=moves[:SHOWN])


def _batch_size(record: StepRecord | None) -> float | None:
    if record is None or not record.values:
        return None
    value = record.values.get("batch_size")
    return value if value is not None and math.isfinite(value) else None


def _series(records: Sequence[LayersRecord], statistic: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        pairs = zip(r.layers, r.grad_norm, strict=False) if statistic == "grad_norm" else r.update_ratio.items()
        for layer, value in pairs:
            if value is not None and math.isfinite(value):
                out.setdefault(layer, []).append((r.step, value))
    return out


def _moves(base: Sequence[LayersRecord], watched: Sequence[LayersRecord], statistic: str) -> list[LayerMove]:
    baseline = {layer: statistics.median(v for _, v in series) for layer, series in _series(base, statistic).items()}
    moves = []
    for layer, series in _series(watched, statistic).items():
        usual = baseline.get(layer)
        if not usual or usual <= 0:
            continue
        moved = next(((s, v) for s, v in series if v > MOVE_FACTOR * usual), None)
        if moved is not None:
            peak = max(v for s, v in series if s >= moved[0])
            moves.append(LayerMove(layer, statistic, moved[0], usual, peak, peak / usual))
    return moves
