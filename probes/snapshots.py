"""In-memory snapshots of model and optimizer state, for the rewind action.

Every ``every`` steps (the same step numbers on every rank) the probe copies the model's and
the optimizer's state to CPU memory and keeps the newest ``keep`` copies: memory is bounded by
``keep`` x (model + optimizer state). CUDA tensors are copied with ``non_blocking=True``;
the copy is ordered on the stream, and a restore (rare) synchronises before reading it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from gradwatch.probes.optimizers import Optimizers


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to("cpu", non_blocking=True) if t.is_cuda else t.clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class Snapshots:
    def __init__(self, model: torch.nn.Module | None, optimizer: Optimizers, every: int,
                 keep: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self._kept: deque[tuple[int, dict[str, Any] | None, dict[str, Any]]] = deque(maxlen=keep)

    @property
    def steps(self) -> list[int]:
        return [step for step, _, _ in self._kept]

    def maybe_take(self, step: int) -> None:
        if step % self.every == 0:
            model_state = _to_cpu(self.model.state_dict()) if self.model is not None else None
            self._kept.append((step, model_state, _to_cpu(self.optimizer.state_dict())))

    def restore(self, before_step: int) -> int:
        """Load the newest snapshot taken before ``before_step``; return its step. ValueError if none."""
        for step, model_state, optimizer_state in reversed(self._kept):
            if step < before_step:
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.current_stream().synchronize()  # the asynchronous copies must have landed
                if model_state is not None and self.model is not None:
                    self.model.load_state_dict(model_state)
                self.optimizer.load_state_dict(_to_cpu(optimizer_state))  # a copy: the snapshot stays reusable
                return step
        kept = ", ".join(map(str, self.steps)) or "none yet"
        raise ValueError(f"no snapshot before step {before_step} (snapshots kept: {kept}; every {self.every} steps)")
