"""Several optimizers watched as one (a script that steps, say, SGD for the body and Adam for the head).

The probe counts steps on the first optimizer; the gradient norm covers every parameter of all of
them, as ``clip_grad_norm_(model.parameters())`` would, and learning rates are reported for their
param groups in order (the first optimizer's groups first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class OptimizerSet:
    """Quacks like one optimizer for what the probe reads: ``param_groups`` and the state dicts."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.members: list[torch.optim.Optimizer] = []
        for optimizer in optimizers:
            self.add(optimizer)

    @property
    def primary(self) -> torch.optim.Optimizer:
        return self.members[0]

    def add(self, optimizer: torch.optim.Optimizer) -> bool:
        """Watch one more optimizer; False when it is already watched."""
        if any(optimizer is member for member in self.members):
            return False
        self.members.append(optimizer)
        return True

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        members = self.members
        if len(members) == 1:
            return members[0].param_groups
        return [group for optimizer in members for group in optimizer.param_groups]

    def state_dict(self) -> list[dict[str, Any]]:
        return [optimizer.state_dict() for optimizer in self.members]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for optimizer, state in zip(self.members, states, strict=True):
            optimizer.load_state_dict(state)


_WRAPPERS = {"AcceleratedOptimizer": "optimizer", "LightningOptimizer": "_optimizer"}


def unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer): step hooks must go on the object whose ``step`` runs them."""
    for _ in range(4):
        attribute = _WRAPPERS.get(type(optimizer).__name__)
        inner = getattr(optimizer, attribute, None) if attribute else None
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


class ModelParameters:
    """The parameters of a model whose script updates them by hand (``p.data.add_(-lr * p.grad)``, no
    torch.optim optimizer), as one param group without a learning rate: what the gradient norm reads."""

    def __init__(self, model: torch.nn.Module) -> None:
        # listed once, not per step: frozen parameters have no gradient, which the meter skips anyway
        self._groups = [{"params": list(model.parameters())}]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._groups


#: What the meters read param groups and state dicts from: one optimizer, or several seen as one.
Optimizers = torch.optim.Optimizer | OptimizerSet
GradientSource = Optimizers | ModelParameters
