"""Per-layer gradient norms and update/weight ratios, sampled every ``every`` optimizer steps.

A layer is the module that owns a parameter (``encoder.0.attn`` for ``encoder.0.attn.weight``).
At a sampled step the pre-step hook computes every layer's gradient norm on the device and
copies the parameters of a few layers (``update_budget_bytes`` at most, rotating through the
model), so that the post-step hook can measure ``||w_after - w_before|| / ||w_before||``: memory
stays bounded for any model size, and every layer is measured in turn. Between sampled steps
nothing is done. The results travel as one tensor, read back off the training thread without a
synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradwatch.probes import readback
from gradwatch.probes.captures import LayersCapture
from gradwatch.probes.gradnorm import HALF_DTYPES, foreach_norms, norm_dtype
from gradwatch.probes.optimizers import Optimizers

DEFAULT_EVERY = 100
DEFAULT_UPDATE_BUDGET_BYTES = 64 * 2**20

def layer_names(model: torch.nn.Module, params: list[torch.Tensor]) -> list[str]:
    """The layer of each parameter: its module's path, ``(root)`` for the model's own parameters."""
    by_id = {id(p): name.rpartition(".")[0] or "(root)" for name, p in model.named_parameters()}
    return [by_id.get(id(p), "(not in model)") for p in params]


def _norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-tensor L2 norms as one float32 vector on ``device``."""
    norms: Sequence[torch.Tensor]
    dtype = norm_dtype(tensors)  # float32 for fp16/bf16: an fp16 norm is inf past 65,504
    if all(t.device == device and not t.is_sparse for t in tensors) and (dtype is not None or not any(
            t.dtype in HALF_DTYPES for t in tensors)):
        norms = foreach_norms(list(tensors), dtype)
    else:
        norms = [torch.linalg.vector_norm(t.coalesce().values() if t.is_sparse else t, 2.0,
                                          dtype=torch.float32 if t.dtype in HALF_DTYPES else None).to(device)
                 for t in tensors]
    return torch.stack(norms).float()


class LayerStats:
    def __init__(self, model: torch.nn.Module, optimizer: Optimizers, every: int,
                 update_budget_bytes: int = DEFAULT_UPDATE_BUDGET_BYTES) -> None:
        self.every = every
        self._model = model
        self._optimizer = optimizer
        self._budget = update_budget_bytes
        self._shape: tuple[int, ...] = ()
        self._params: list[torch.Tensor] = []
        self._names: list[str] = []  # one per layer
        self._layer_of: list[int] = []  # layer index of each parameter
        self._cursor = 0  # next layer whose update is measured
        self._pending: tuple[Any, ...] | None = None

    def _layout(self) -> None:
        groups = self._optimizer.param_groups
        shape = tuple(len(group["params"]) for group in groups)
        if shape == self._shape:
            return
        self._shape = shape
        self._params = [p for group in groups for p in group["params"]]
        per_param = layer_names(self._model, self._params)
        index: dict[str, int] = {}
        self._layer_of = [index.setdefault(name, len(index)) for name in per_param]
        self._names = list(index)
        self._cursor = 0

    def before_step(self) -> None:
        """Pre-step hook of a sampled step: gradient norms per layer, and a copy of a few layers."""
        self._layout()
        with torch.no_grad():
            pairs = [(i, p) for i, p in enumerate(self._params) if p.grad is not None]
            grads = [g for _, p in pairs if (g := p.grad) is not None]
            if not pairs:
                self._pending = None
                return
            device = grads[0].device
            n_layers = len(self._names)
            layer_index = torch.tensor([self._layer_of[i] for i, _ in pairs], device=device)
            grad_sq = torch.zeros(n_layers, device=device).index_add_(
                0, layer_index, _norms(grads, device).square())
            covered = self._next_layers(pairs)
            chosen = [(i, p) for i, p in pairs if self._layer_of[i] in covered]
            before = [p.detach().clone() for _, p in chosen]
            self._pending = (device, grad_sq, chosen, before, sorted(covered))

    def _next_layers(self, pairs: list[tuple[int, torch.Tensor]]) -> set[int]:
        """Layers, from the cursor on, whose parameters fit in the copy budget (at least one)."""
        size = [0] * len(self._names)
        for i, p in pairs:
            size[self._layer_of[i]] += p.numel() * p.element_size()
        present = [layer for layer in range(len(self._names)) if size[layer]]
        start = next((k for k, layer in enumerate(present) if layer >= self._cursor), 0)
        chosen: set[int] = set()
        used = 0
        for layer in present[start:] + present[:start]:
            if chosen and used + size[layer] > self._budget:
                break
            chosen.add(layer)
            used += size[layer]
        self._cursor = max(chosen) + 1 if max(chosen) + 1 < len(self._names) else 0
        return chosen

    def after_step(self, step: int, t: float) -> LayersCapture | None:
        """Post-step hook of a sampled step: the queue item for the writer thread, or None."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        device, grad_sq, chosen, before, covered = pending
        with torch.no_grad():
            n_layers = len(self._names)
            values = [grad_sq.sqrt()]
            if chosen:
                after = [p.detach() for _, p in chosen]
                layer_index = torch.tensor([self._layer_of[i] for i, _ in chosen], device=device)
                update_sq = torch.zeros(n_layers, device=device).index_add_(
                    0, layer_index, _norms(torch._foreach_sub(after, before), device).square())
                weight_sq = torch.zeros(n_layers, device=device).index_add_(
                    0, layer_index, _norms(before, device).square())
                cover = torch.tensor(covered, device=device)
                values.append((update_sq[cover] / weight_sq[cover]).sqrt())
            vector = torch.cat(values)
        return LayersCapture(step, t, tuple(self._names), readback.capture_vector(vector), n_layers, tuple(covered))
