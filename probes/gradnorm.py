"""The global gradient L2 norm in one fused pass, as torch.nn.utils.clip_grad_norm_ computes it."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter the optimizer updates (parameters without one are skipped)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def global_grad_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """L2 norm over all gradients together, as a 0-dim float32 tensor on the first gradient's device.

    One ``_foreach_norm`` kernel per device, then the norm of the per-tensor norms: no host
    synchronisation, nothing read back. None when there are no gradients.
    """
    grads = list(grads)
    if not grads:
        return None
    first_device = grads[0].device
    if all(g.device == first_device and not g.is_sparse for g in grads):
        norms = list(torch._foreach_norm(grads, 2.0))
    else:
        norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g, 2.0).to(first_device) for g in grads]
    stacked = torch.stack(norms)
    if stacked.dtype not in (torch.float32, torch.float64):
        stacked = stacked.float()  # half-precision norms lose too much when squared and summed
    return torch.linalg.vector_norm(stacked, 2.0)
