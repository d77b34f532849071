"""Gradients sharded over ranks without DTensor: FSDP1, DeepSpeed ZeRO, Megatron's tensor parallelism.

Each rank then holds part of every gradient, or its own parameters' gradients, and a norm over what one rank
holds is that shard's, not the model's: guards acting on it would clip or skip each rank with its own
coefficient, and the ranks' weights would drift apart. With ``attach(..., shard_group=group)`` the probe adds
the ranks' squared norms over ``group`` (one all-reduce of one number per step, on every rank, as FSDP's own
``clip_grad_norm_`` does); without it, sharding this module recognises is said once, and no norm is recorded
(so no guard acts on a shard's). FSDP2 (DTensor gradients) is handled by probes/gradnorm.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch

SHARD_GROUP_ENV = "GRADWATCH_SHARD_GROUP"
log = logging.getLogger("gradwatch")


def resolve_shard_group(group: Any) -> Any:
    """attach's ``shard_group``: a process group, ``"world"`` (torch.distributed's default group), or None (then
    ``$GRADWATCH_SHARD_GROUP``, for ``gradwatch run``). ValueError, naming the fix, for anything else."""
    import torch.distributed as dist

    if group is None:
        from_env = os.environ.get(SHARD_GROUP_ENV, "").strip()
        if not from_env:
            return None
        # gradwatch run: a mistake in the environment must not stop the training; said once, left out
        if from_env.lower() != "world" or not (dist.is_available() and dist.is_initialized()):
            log.warning("gradwatch: $%s=%r ignored: it takes 'world', once torch.distributed is initialised",
                        SHARD_GROUP_ENV, from_env)
            return None
        return dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gradwatch.attach: shard_group needs torch.distributed initialised first "
                         "(init_process_group before attach)")
    if isinstance(group, str):
        if group.strip().lower() != "world":
            raise ValueError(f"gradwatch.attach: shard_group must be a process group or 'world', got {group!r}")
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"gradwatch.attach: shard_group must be a torch.distributed ProcessGroup or 'world', got "
                         f"{type(group).__name__}")
    return group


def recognised_sharding(model: torch.nn.Module | None, optimizers: Iterable[torch.optim.Optimizer],
                        params: Iterable[torch.Tensor]) -> str | None:
    """What shards these gradients, by the marks each library leaves (None: nothing recognised). Looked at once,
    at attach: the library's classes are matched by name, so that none of them is imported here."""
    for module in model.modules() if model is not None else ():
        name = type(module).__name__
        if name == "FullyShardedDataParallel":
            return "FSDP (FullyShardedDataParallel)"
        if name == "DeepSpeedEngine":
            return "DeepSpeed"
    for optimizer in optimizers:
        name = type(optimizer).__name__
        if name.startswith("DeepSpeedZero") or name == "DeepSpeedZeroOptimizer_Stage3":
            return f"DeepSpeed ZeRO ({name})"
    for p in params:
        if getattr(p, "_is_flat_param", False):
            return "FSDP (FullyShardedDataParallel)"
        if hasattr(p, "ds_id"):
            return "DeepSpeed ZeRO-3"
        if getattr(p, "tensor_model_parallel", False):
            return "Megatron tensor parallelism"
    return None


def reduced_norm(local: torch.Tensor, group: Any) -> torch.Tensor:
    """The norm over the whole group from each rank's local norm: sqrt(sum of the squares), one all-reduce of one
    float32 (on CUDA queued on the stream, no host synchronisation)."""
    import torch.distributed as dist

    squared = local.detach().float().square()
    dist.all_reduce(squared, group=group)
    return squared.sqrt()
