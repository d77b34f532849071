"""Per-layer gradient norms and update/weight ratios, sampled every ``every`` optimizer steps.

A layer is the module that owns a parameter (``encoder.0.attn`` for ``encoder.0.attn.weight``).
At a sampled step the pre-step hook computes every layer's gradient norm, mean absolute gradient and share of
exactly-zero gradients on the device and
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


def _norms(tensors: Sequence[torch.Tensor], device: torch.device, order: float = 2.0) -> torch.Tensor:
    """Per-tensor norms of ``order`` (2: L2; 1: the sum of absolute values; 0: the count of non-zeros) as one
    float32 vector on ``device``."""
    norms: Sequence[torch.Tensor]
    dtype = norm_dtype(tensors)  # float32 for fp16/bf16: an fp16 norm is inf past 65,504
    if order == 2.0 and all(t.device == device and not t.is_sparse for t in tensors) and (
            dtype is not None or not any(t.dtype in HALF_DTYPES for t in tensors)):
        norms = foreach_norms(list(tensors), dtype)
    elif all(t.device == device and not t.is_sparse for t in tensors) and not any(
            t.dtype in HALF_DTYPES for t in tensors):
        norms = torch._foreach_norm(list(tensors), order)
    else:
        norms = [torch.linalg.vector_norm(t.coalesce().values() if t.is_sparse else t, order,
                                          dtype=torch.float32 if t.dtype in HALF_DTYPES else None).to(device)
                 for t in tensors]
    return torch.stack(norms).float()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), any other tensor as it is: the statistics are made of local sums."""
    return tensor.to_local() if hasattr(tensor, "placements") else tensor  # type: ignore[attr-defined,no-any-return,unused-ignore]


def _shard_groups(tensor: torch.Tensor) -> list[Any]:
    """The process groups over which a DTensor is sharded (one per sharded mesh dimension); [] when it is not."""
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return []
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    return [mesh.get_group(dim) for dim, p in enumerate(placements) if p.is_shard()]


class LayerStats:
    """Per-layer statistics of one optimizer's parameters.

    Squared norms are summed per layer with ``index_add_`` on the device, by index tensors kept on the device (one
    per pattern of parameters: building them from a Python list each sampled step would copy from pageable memory,
    a synchronisation each). Sharded DTensor gradients (FSDP2) add their local sums into a second half of each
    vector, which one all-reduce per sampled step adds up over the shards' ranks (every rank samples the same steps).
    """

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
        self._indices: dict[tuple[Any, ...], torch.Tensor] = {}  # index tensors on the device, by pattern
        self._groups: list[Any] = []  # the shard groups of the sharded gradients ([]: none)

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
        self._indices.clear()
        self._groups = next((g for p in self._params if (g := _shard_groups(p))), [])

    def _on_device(self, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (device, values)
        tensor = self._indices.get(key)
        if tensor is None:
            if len(self._indices) >= 256:  # patterns come and go (a frozen layer thawed): bounded
                self._indices.clear()
            tensor = self._indices[key] = torch.tensor(values, dtype=torch.long).to(device)
        return tensor

    def _layer_index(self, tensors: Sequence[torch.Tensor], indices: list[int], device: torch.device) -> torch.Tensor:
        n = len(self._names)
        sharded = [bool(_shard_groups(t)) for t in tensors] if self._groups else [False] * len(tensors)
        return self._on_device(tuple(self._layer_of[i] + (n if s else 0) for i, s in zip(indices, sharded,
                                                                                         strict=True)), device)

    def _layer_sums(self, tensors: Sequence[torch.Tensor], indices: list[int], device: torch.device,
                    order: float = 2.0) -> torch.Tensor:
        """Per-layer sums over ``tensors``, ``[unsharded | sharded]``, 2 x layers long: of the squared L2 norms
        (order 2), of the absolute values (1), of the non-zero counts (0)."""
        norms = _norms([_local(t) for t in tensors], device, order)
        return torch.zeros(2 * len(self._names), device=device).index_add_(
            0, self._layer_index(tensors, indices, device), norms.square() if order == 2.0 else norms)

    def _layer_sizes(self, tensors: Sequence[torch.Tensor], indices: list[int], device: torch.device) -> torch.Tensor:
        """Elements per layer (local shards: summed over the shards' ranks with the rest), as ``_layer_sums``."""
        key = ("numel", device, tuple(indices))
        sizes = self._indices.get(key)
        if sizes is None:
            sizes = self._indices[key] = torch.tensor([float(_local(t).numel()) for t in tensors]).to(device)
        return torch.zeros(2 * len(self._names), device=device).index_add_(
            0, self._layer_index(tensors, indices, device), sizes)

    def before_step(self) -> None:
        """Pre-step hook of a sampled step: gradient norms per layer, and a copy of a few layers."""
        self._layout()
        with torch.no_grad():
            pairs = [(i, p) for i, p in enumerate(self._params) if p.grad is not None]
            grads = [g for _, p in pairs if (g := p.grad) is not None]
            if not pairs:
                self._pending = None
                return
            device = _local(grads[0]).device
            indices = [i for i, _ in pairs]
            # squared L2 norms, absolute sums, non-zero counts and sizes of the gradients, per layer; a parameter
            # that requires a gradient and got none this step (a detach(), a branch left out) counts as zeros,
            # one frozen on purpose (requires_grad off) not at all
            wanting = [(i, p) for i, p in enumerate(self._params) if p.requires_grad]
            grad_sums = [self._layer_sums(grads, indices, device), self._layer_sums(grads, indices, device, 1.0),
                         self._layer_sums(grads, indices, device, 0.0),
                         self._layer_sizes([p for _, p in wanting], [i for i, _ in wanting], device)]
            covered = self._next_layers(pairs)
            chosen = [(i, p) for i, p in pairs if self._layer_of[i] in covered]
            before = [p.detach().clone() for _, p in chosen]
            self._pending = (device, grad_sums, chosen, before, sorted(covered))

    def _next_layers(self, pairs: list[tuple[int, torch.Tensor]]) -> set[int]:
        """Layers, from the cursor on, whose parameters fit in the copy budget (at least one)."""
        size = [0] * len(self._names)
        for i, p in pairs:
            local = _local(p)
            size[self._layer_of[i]] += local.numel() * local.element_size()
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
        device, grad_sums, chosen, before, covered = pending
        n = len(self._names)
        with torch.no_grad():
            parts = list(grad_sums)
            if chosen:
                indices = [i for i, _ in chosen]
                after = [p.detach() for _, p in chosen]
                parts.append(self._layer_sums(torch._foreach_sub(after, before), indices, device))
                parts.append(self._layer_sums(before, indices, device))
            sums = torch.stack(parts)  # (4 or 6) x [unsharded | sharded]
            if self._groups:
                import torch.distributed as dist

                shards = sums[:, n:].contiguous()
                for group in self._groups:  # the shards' ranks, one mesh dimension at a time
                    dist.all_reduce(shards, group=group)
                sums = sums[:, :n] + shards
            else:
                sums = sums[:, :n]
            size = sums[3]
            # L2 norm, mean |g|, share of zeros; NaN (left out) for a layer without gradients (frozen)
            values = [sums[0].sqrt(), sums[1] / size, 1.0 - sums[2] / size]
            if chosen:
                cover = self._on_device(tuple(covered), device)
                values.append((sums[4][cover] / sums[5][cover]).sqrt())
            vector = torch.cat(values)
        return LayersCapture(step, t, tuple(self._names), readback.capture_vector(vector), n, tuple(covered))
