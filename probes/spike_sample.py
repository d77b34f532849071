"""The on-trigger layer sample of a spike: every layer's gradient norm at the very step that spiked.

Periodic layer samples (``layer_stats_every``) rarely fall on a spike. The writer thread runs the agent's own spike
statistic (rules/ema.py, same defaults, same values in the same order: the steps it flags are the steps the agent
counts in ``gradwatch_spikes_total``) over the loss and gradient norm it reads anyway, and at a spike turns the
per-tensor norms the fused norm pass made for that step into per-layer norms: one copy of that small vector, on
the writer thread, at spike steps only. Nothing happens on healthy steps beyond two additions per value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from gradwatch.probes import graph_capture
from gradwatch.probes.nonfinite import layer_of
from gradwatch.rules.ema import EmaZScore
from gradwatch.spool.records import SPIKE_SAMPLE_GAP, LayersRecord, LogRecord, StepRecord

#: a spike sample at most this often: a run whose level moved spikes many steps in a row until the statistic
#: re-adapts (readapt_after), and the first of them says what moved
MIN_GAP_STEPS = SPIKE_SAMPLE_GAP


class SpikeSampler:
    def __init__(self, param_names: Callable[[], list[str]]) -> None:
        self._names = param_names
        self._loss, self._grad_norm = EmaZScore(), EmaZScore()
        self._last_sampled = -MIN_GAP_STEPS

    def spiked(self, record: StepRecord | LogRecord) -> str:
        """Feed a record's loss and gradient norm as the agent does; the quantity that spiked, or ""."""
        spiked = ""
        if record.__class__ is StepRecord:
            norm = record.grad_norm
            if norm is not None and record.skip != "amp" and self._grad_norm.update(norm):
                spiked = "grad_norm"
        loss = (record.values or {}).get("loss")
        if loss is not None and self._loss.update(loss) and not spiked:
            spiked = "loss"
        return spiked

    def sample(self, record: StepRecord, quantity: str, parts: tuple[Sequence[torch.Tensor], Sequence[int]] | None
               ) -> LayersRecord | None:
        """The per-layer gradient norms of a step that spiked, when its per-tensor norms are at hand (None when
        the script's own clip gave the norm, or too soon after the last sample)."""
        if parts is None or record.step - self._last_sampled < MIN_GAP_STEPS or graph_capture.active():
            return None
        norms, owners = parts
        if not norms:
            return None
        values = (torch.stack([n.reshape(()).float() for n in norms]).cpu().tolist() if not norms[0].is_cpu
                  else [float(n) for n in norms])
        names = self._names()
        squares: dict[str, float] = {}
        for value, owner in zip(values, owners, strict=False):
            layer = layer_of(names[owner]) if 0 <= owner < len(names) else "(not in model)"
            squares[layer] = squares.get(layer, 0.0) + value * value
        self._last_sampled = record.step
        return LayersRecord(step=record.step, t=record.t, layers=list(squares),
                            grad_norm=[math.sqrt(v) if math.isfinite(v) else None for v in squares.values()],
                            trigger=f"spike:{quantity}")
