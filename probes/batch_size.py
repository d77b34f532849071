"""Samples per step for a script that does not log ``batch_size`` (``gradwatch run``): counted from the
model's training forward passes, so that a zero-code run has throughput.

The rule (docs/attaching.md): each forward pass of the model in training mode with gradients enabled
adds the size of dimension ``dim`` of the first tensor among its positional inputs (a tensor, or the
first tensor inside a tuple, list or dict). ``dim`` is 0, or 1 when the model's first module with a
``batch_first`` attribute has it False (torch's RNNs and Transformer layers take (seq, batch, ...) by
default). Forward passes of the micro-batches of one step add up. ``GRADWATCH_BATCH_SIZE`` (``auto``,
``off`` or a number of samples per forward pass) and ``GRADWATCH_BATCH_DIM`` override it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

ENV_SIZE = "GRADWATCH_BATCH_SIZE"
ENV_DIM = "GRADWATCH_BATCH_DIM"


class SampleCounter:
    """Adds up the samples of a step's training forward passes; ``take()`` at the step's end."""

    __slots__ = ("dim", "dim_given", "fixed", "samples")

    def __init__(self, dim: int | None = None, fixed: int | None = None) -> None:
        self.dim = dim or 0
        self.dim_given = dim is not None
        self.fixed = fixed
        self.samples = 0

    def use_model(self, model: torch.nn.Module) -> None:
        """The model whose inputs are counted is known: its layout decides the batch dimension."""
        if not self.dim_given:
            self.dim = batch_dim(model)

    def on_forward(self, module: torch.nn.Module, args: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation: not the samples a step trains on
        n = self.fixed if self.fixed is not None else leading_size(args, self.dim)
        if n:
            self.samples += n

    def take(self) -> int:
        samples, self.samples = self.samples, 0
        return samples


def leading_size(inputs: Any, dim: int) -> int:
    """Size of dimension ``dim`` of the first tensor in ``inputs`` (nested in tuples, lists, dicts), else 0."""
    for _ in range(4):  # a few levels of nesting at most
        if isinstance(inputs, torch.Tensor):
            return int(inputs.shape[dim]) if inputs.dim() > dim else 0
        if isinstance(inputs, Mapping):
            inputs = next(iter(inputs.values()), None)
        elif isinstance(inputs, (tuple, list)):
            inputs = next((x for x in inputs if isinstance(x, (torch.Tensor, Mapping, tuple, list))), None)
        else:
            return 0
    return 0


def batch_dim(model: torch.nn.Module) -> int:
    """1 for models whose first ``batch_first``-aware module takes (seq, batch, ...), else 0."""
    for module in model.modules():
        batch_first = getattr(module, "batch_first", None)
        if isinstance(batch_first, bool):
            return 0 if batch_first else 1
    return 0


class BatchSizeSettingError(ValueError):
    pass


def counter_from_environment(environ: Mapping[str, str] = os.environ) -> SampleCounter | None:
    """The counter ``gradwatch run`` asked for (None: ``off``); raises BatchSizeSettingError."""
    size = (environ.get(ENV_SIZE) or "auto").strip().lower()
    if size == "off":
        return None
    fixed = None
    if size != "auto":
        try:
            fixed = int(size)
        except ValueError:
            raise BatchSizeSettingError(f"{ENV_SIZE}={size!r}: expected auto, off or a number of samples") from None
        if fixed <= 0:
            raise BatchSizeSettingError(f"{ENV_SIZE}={size!r}: expected a positive number of samples")
    dim_text = environ.get(ENV_DIM)
    dim = None
    if dim_text:
        try:
            dim = int(dim_text)
        except ValueError:
            raise BatchSizeSettingError(f"{ENV_DIM}={dim_text!r}: expected a dimension index (0, 1, ...)") from None
        if dim < 0:
            raise BatchSizeSettingError(f"{ENV_DIM}={dim_text!r}: expected a dimension index (0, 1, ...)")
    return SampleCounter(dim, fixed)
