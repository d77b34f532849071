"""The global gradient L2 norm in one fused pass, as torch.nn.utils.clip_grad_norm_ computes it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from gradwatch.probes.optimizers import GradientSource
from gradwatch.probes.readback import Deferred
from gradwatch.probes.sharding import reduced_norm


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter the optimizer updates (parameters without one are skipped)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def sharded(grad: torch.Tensor) -> bool:
    """A DTensor sharded over ranks (FSDP2), not replicated."""
    placements = getattr(grad, "placements", None)  # a DTensor: torch.distributed.tensor, not imported here
    return placements is not None and any(not p.is_replicate() for p in placements)


def replicated_local(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's local value (FSDP2's clip_grad_norm_ result: every rank holds the global norm);
    any other tensor as it is."""
    placements = getattr(value, "placements", None)
    if placements is not None and all(p.is_replicate() for p in placements):
        return value.to_local()  # type: ignore[attr-defined,no-any-return,unused-ignore]  # a DTensor
    return value


HALF_DTYPES = (torch.float16, torch.bfloat16)


def norm_dtype(grads: Sequence[torch.Tensor]) -> torch.dtype | None:
    """float32 for half-precision gradients: an fp16 norm is inf past 65,504 (a false non-finite step, which the
    skip guard would skip), so norms are accumulated and returned in float32 (as GradScaler's unscale checks do
    in their own dtype); None (each tensor's own dtype) otherwise."""
    dtypes = {g.dtype for g in grads}
    return torch.float32 if dtypes & set(HALF_DTYPES) and torch.float64 not in dtypes else None


def foreach_norms(grads: list[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    return list(torch._foreach_norm(grads, 2.0, dtype=dtype) if dtype is not None else torch._foreach_norm(grads, 2.0))


def _fusable(grads: list[torch.Tensor]) -> bool:
    """One fused kernel takes them: one device, dense, and not half precision beside float64 (float32 norms
    would narrow the float64 ones: those go tensor by tensor, each in its own precision or float32)."""
    first = grads[0].device
    dtypes = {g.dtype for g in grads}
    return all(g.device == first and not g.is_sparse for g in grads) and not (
        dtypes & set(HALF_DTYPES) and torch.float64 in dtypes)


def _norm_of_norms(norms: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(norms)
    if stacked.dtype not in (torch.float32, torch.float64):
        stacked = stacked.float()  # half-precision norms lose too much when squared and summed
    return torch.linalg.vector_norm(stacked, 2.0)


def global_grad_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """L2 norm over all gradients together, as a 0-dim tensor on the first gradient's device.

    One ``_foreach_norm`` kernel for all gradients on one device, then the norm of the
    per-tensor norms: no host synchronisation, nothing read back. None when there are none.
    """
    grads = list(grads)
    if not grads:
        return None
    return _norm_of_norms(foreach_norms(grads, norm_dtype(grads)) if _fusable(grads) else _per_tensor_norms(grads))


def _per_tensor_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """For gradients one fused kernel cannot take: sparse ones, or spread over devices."""
    first = grads[0].device
    return [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g, 2.0,
                                     dtype=torch.float32 if g.dtype in HALF_DTYPES else None).to(first) for g in grads]


_FEW_TENSORS = 32  # below this, reading each norm beats one stack + norm (benchmarked)


class NormOfNorms(Deferred):
    """Per-tensor norms of CPU gradients; the writer thread combines them into the global norm,
    which saves the training thread two calls into torch."""

    __slots__ = ("norms",)

    def __init__(self, norms: Sequence[torch.Tensor]) -> None:
        self.norms = norms

    def tensor(self) -> torch.Tensor:
        return _norm_of_norms(list(self.norms))

    def resolve(self) -> float:
        """The global norm as a float. Few tensors are read one by one and combined in Python (float64):
        several times cheaper than stacking them (this runs on the writer thread, holding the GIL)."""
        norms = self.norms
        if len(norms) > _FEW_TENSORS:
            return self.tensor().item()
        parts = [n.item() for n in norms]
        total = math.hypot(*parts)
        if total == math.inf and any(p != p for p in parts):
            return math.nan  # torch's norm of [inf, nan] is nan; hypot's is inf
        return total

    def value_now(self) -> float:
        """The global norm on the training thread (for the guards): the same number the record gets."""
        return self.resolve()


class GradNormMeter:
    """``global_grad_norm`` for one optimizer, with the per-step Python work cut to the minimum:
    the flat parameter list and the fusability check are cached until the parameters change.

    Returns a 0-dim tensor on the gradients' device, or, for CPU gradients, a NormOfNorms that
    the writer thread finishes.
    """

    def __init__(self, optimizer: GradientSource, shard_group: Any = None, sharded_by: str | None = None) -> None:
        self._optimizer = optimizer
        self._shard_group = shard_group  # attach(shard_group=): the norm is reduced over it (probes/sharding.py)
        self.sharded_by = sharded_by if shard_group is None else None  # recognised sharding, no group: no norm
        self._params: list[torch.Tensor] = []
        self._shape: tuple[int, ...] = ()
        self._checked_for = -1  # number of gradients the checks below were made for
        self._fusable = True
        self._on_cpu = False
        self._sharded = False  # FSDP2/DTensor gradients: each rank holds shards of them
        self._dtype: torch.dtype | None = None  # of the norms (norm_dtype)
        self.last_parts: list[torch.Tensor] | None = None  # this step's per-tensor norms (None: a reused norm)
        self.grad_owners: list[int] = []  # the index in ``params`` of each of them

    @property
    def params(self) -> list[torch.Tensor]:
        """The optimizer's parameters, as of the last call."""
        return self._params

    @property
    def fusable(self) -> bool:
        return self._fusable

    @property
    def sharded(self) -> bool:
        """The gradients are sharded DTensors (FSDP2): their global norm needs an all-reduce, which the
        probe never issues (a collective only some ranks reach would hang them all); it records the
        result of the script's own ``clip_grad_norm_``, which does that all-reduce, and else no norm."""
        return self._sharded

    def __call__(self, reuse: tuple[torch.Tensor, int] | None = None) -> torch.Tensor | NormOfNorms | None:
        """The norm of the current gradients. ``reuse``: (norm, number of gradients) of a
        ``clip_grad_norm_`` call the script made on these gradients; taken instead of computing
        the norm again when it covered as many gradients as the optimizers hold."""
        groups = self._optimizer.param_groups
        shape = tuple(len(group["params"]) for group in groups)
        if shape != self._shape:  # a param group was added or changed
            # several optimizers may share a parameter: count it once
            self._params = list({id(p): p for group in groups for p in group["params"]}.values())
            self._shape = shape
            self._checked_for = -1
        grads = [g for p in self._params if (g := p.grad) is not None]
        if not grads:
            if self._shard_group is not None and self._params:  # the other ranks wait for this one's part: zero
                return reduced_norm(torch.zeros((), device=self._params[0].device), self._shard_group)
            return None
        self.last_parts = None
        if self._checked_for != len(grads):  # before a reused norm too: the guards scale by `fusable`
            self._checked_for = len(grads)
            self.grad_owners = [i for i, p in enumerate(self._params) if p.grad is not None]
            self._sharded = any(sharded(g) for g in grads)
            self._fusable = _fusable(grads)
            self._on_cpu = grads[0].is_cpu
            self._dtype = norm_dtype(grads)
        if self.sharded_by is not None:
            return None  # a shard's norm is not the model's (probes/sharding.py)
        if self._shard_group is not None:  # each rank holds a shard: the script's clip (if any) saw only this one's
            local = _norm_of_norms(foreach_norms(grads, self._dtype) if self._fusable else _per_tensor_norms(grads))
            return reduced_norm(local, self._shard_group)
        if reuse is not None and reuse[1] == len(grads):
            return reuse[0]
        if self._sharded:
            return None  # only the script's clip_grad_norm_ (reused above) has the global norm without a collective
        norms = foreach_norms(grads, self._dtype) if self._fusable else _per_tensor_norms(grads)
        self.last_parts = norms  # kept by reference: which gradients were non-finite, should the norm be
        if not self._fusable:
            return _norm_of_norms(norms)
        return NormOfNorms(norms) if self._on_cpu else _norm_of_norms(norms)
