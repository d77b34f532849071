"""In-memory snapshots of model and optimizer state, for the rewind action.

Every ``every`` steps (the same step numbers on every rank) the probe copies the model's and the optimizer's
tensors into host buffers and keeps the newest ``keep`` copies. The buffers are allocated once per slot (pinned,
for CUDA tensors) and reused: the oldest slot is overwritten in place, so host memory is ``keep`` x (model +
optimizer state), never one more while the next copy is made. CUDA copies are ``non_blocking`` and ordered on
the stream; nothing reads the buffers on the host. A restore copies them back into the live tensors, in place
(no second copy of the state on the device, and the tensors, param groups and the schedulers holding them stay
the same objects), unless the state's layout changed since the snapshot (then the optimizer loads it as a state
dict). DTensor state (FSDP2) is copied shard by shard.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from gradwatch.probes.optimizers import Optimizers, OptimizerSet

# Where a tensor of the state lives: ("model", name) or ("optimizer", member, group, index in group, key).
Place = tuple[Any, ...]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "placements") else tensor  # type: ignore[attr-defined,no-any-return,unused-ignore]


def _members(optimizer: Optimizers) -> list[torch.optim.Optimizer]:
    return optimizer.members if isinstance(optimizer, OptimizerSet) else [optimizer]


@dataclass
class _State:
    """The live state, as references: its tensors (in a fixed order), where each lives, and the rest by value."""

    tensors: list[torch.Tensor]
    places: list[Place]
    groups: list[list[dict[str, Any]]]  # per optimizer, each group's settings without "params" (lr...)
    scalars: list[tuple[int, int, int, str, Any]]  # (optimizer, group, index, key, value) of non-tensor state

    @property
    def layout(self) -> tuple[Any, ...]:
        return tuple((place, tuple(t.shape), t.dtype, t.device) for place, t in
                     zip(self.places, (_local(t) for t in self.tensors), strict=True))


def _live(model: torch.nn.Module | None, optimizer: Optimizers) -> _State:
    state = _State([], [], [], [])
    if model is not None:
        for name, value in model.state_dict().items():  # detached tensors sharing the parameters' storage
            if isinstance(value, torch.Tensor):
                state.tensors.append(value)
                state.places.append(("model", name))
    for m, member in enumerate(_members(optimizer)):
        state.groups.append([{k: v for k, v in group.items() if k != "params"} for group in member.param_groups])
        for g, group in enumerate(member.param_groups):
            for i, param in enumerate(group["params"]):
                for key, value in member.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor):
                        state.tensors.append(value)
                        state.places.append(("optimizer", m, g, i, key))
                    else:
                        state.scalars.append((m, g, i, key, value))
    return state


@dataclass
class _Slot:
    step: int = -1
    layout: tuple[Any, ...] = ()
    buffers: list[torch.Tensor] = field(default_factory=list)
    groups: list[list[dict[str, Any]]] = field(default_factory=list)
    scalars: list[tuple[int, int, int, str, Any]] = field(default_factory=list)


class Snapshots:
    def __init__(self, model: torch.nn.Module | None, optimizer: Optimizers, every: int,
                 keep: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self._slots = [_Slot() for _ in range(keep)]
        self._next = 0  # the slot the next snapshot overwrites: the oldest

    @property
    def steps(self) -> list[int]:
        """The steps kept, oldest first."""
        ordered = self._slots[self._next:] + self._slots[:self._next]
        return [slot.step for slot in ordered if slot.step >= 0]

    def maybe_take(self, step: int) -> None:
        if step % self.every == 0:
            self.take(step)

    def take(self, step: int) -> None:
        live = _live(self.model, self.optimizer)
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        layout = live.layout
        if slot.layout != layout:  # the first snapshot in this slot, or the state grew (Adam's moments at step 1)
            slot.buffers = [torch.empty_like(local, device="cpu", pin_memory=local.is_cuda)
                            for local in (_local(t) for t in live.tensors)]
            slot.layout = layout
        with torch.no_grad():
            for buffer, tensor in zip(slot.buffers, live.tensors, strict=True):
                local = _local(tensor)
                buffer.copy_(local, non_blocking=local.is_cuda)
        slot.step = step
        slot.groups = copy.deepcopy(live.groups)
        slot.scalars = copy.deepcopy(live.scalars)

    def restore(self, before_step: int) -> int:
        """Load the newest snapshot taken before ``before_step``; return its step. ValueError if none."""
        kept = [slot for slot in self._slots if 0 <= slot.step < before_step]
        if not kept:
            steps = ", ".join(map(str, self.steps)) or "none yet"
            raise ValueError(f"no snapshot before step {before_step} (snapshots kept: {steps}; every {self.every} "
                             "steps)")
        slot = max(kept, key=lambda s: s.step)
        live = _live(self.model, self.optimizer)
        members = _members(self.optimizer)
        if live.layout == slot.layout:
            with torch.no_grad():
                for tensor, buffer in zip(live.tensors, slot.buffers, strict=True):
                    local = _local(tensor)
                    local.copy_(buffer, non_blocking=local.is_cuda)
            for m, member in enumerate(members):
                for group, saved in zip(member.param_groups, slot.groups[m], strict=True):
                    group.update(copy.deepcopy(saved))
            for m, g, i, key, value in slot.scalars:
                param = members[m].param_groups[g]["params"][i]
                members[m].state[param][key] = copy.deepcopy(value)
        else:
            self._load(slot, members)
        return slot.step

    def _load(self, slot: _Slot, members: list[torch.optim.Optimizer]) -> None:
        """The state's layout changed since the snapshot (a param group added, state the snapshot had not yet):
        the model and optimizers load it as state dicts (which copy it to the device)."""
        if [len(m.param_groups) for m in members] != [len(groups) for groups in slot.groups]:
            raise ValueError("the optimizer's param groups changed since the snapshot; it cannot be restored")
        model_state: dict[str, torch.Tensor] = {}
        states: list[dict[int, dict[str, Any]]] = [{} for _ in members]
        for (place, _, _, _), buffer in zip(slot.layout, slot.buffers, strict=True):
            if place[0] == "model":
                model_state[place[1]] = buffer
            else:
                _, m, g, i, key = place
                states[m].setdefault(_index(members[m], g, i), {})[key] = buffer
        for m, g, i, key, value in slot.scalars:
            states[m].setdefault(_index(members[m], g, i), {})[key] = copy.deepcopy(value)
        if self.model is not None and model_state:
            self.model.load_state_dict(model_state)
        for m, member in enumerate(members):
            groups = [{**copy.deepcopy(saved), "params": [_index(member, g, i) for i in range(len(group["params"]))]}
                      for g, (group, saved) in enumerate(zip(member.param_groups, slot.groups[m], strict=True))]
            member.load_state_dict({"state": states[m], "param_groups": groups})


def _index(optimizer: torch.optim.Optimizer, group: int, index: int) -> int:
    """A parameter's index in ``optimizer.state_dict()``: counted over the groups in order."""
    return sum(len(g["params"]) for g in optimizer.param_groups[:group]) + index
