"""LR cuts that hold whatever sets the learning rate (training thread).

Most LLM scripts compute warm-up + cosine themselves and assign ``param_group["lr"]`` before every
step; image-model trainers and frameworks use schedulers of their own. An edit of ``group["lr"]``
is erased by the next assignment, so a cut is kept as a ratio to the LR the script sets: just before
an optimizer's update the group's LR becomes ``min(lr, max(lr * ratio, min_lr))`` (never above what
the script set), and just after it the script's own value is put back. Schedulers and scripts thus
keep computing from their own values, and the update uses the cut one.

While the script's LR stays what it was when the cut was made, the cut LR is the exact result of
``reduced_lr`` (torch's ReduceLROnPlateau arithmetic), not a product of ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gradwatch.rules.lr import reduced_lr


@dataclass
class GroupCut:
    group: dict[str, Any]
    script_lr: float  # the script's LR when the cut LR was computed
    cut_lr: float  # the LR in effect for that script LR
    min_lr: float
    saved: Any = None  # the script's value, while the cut one is set for an update

    @property
    def ratio(self) -> float:
        return self.cut_lr / self.script_lr if self.script_lr else 1.0

    def for_script_lr(self, lr: float) -> float:
        """The LR an update uses when the script has set ``lr``."""
        if lr == self.script_lr:
            return self.cut_lr
        return min(lr, max(lr * self.ratio, self.min_lr))


class LRCut:
    """The cuts of one probe's param groups; nothing is done for groups never cut."""

    def __init__(self) -> None:
        self.cuts: dict[int, GroupCut] = {}  # id(param group) -> its cut
        self._hooks: list[Any] = []
        self._hooked: set[int] = set()  # optimizers whose own step hooks apply the cut

    def __bool__(self) -> bool:
        return bool(self.cuts)

    def reduce(self, group: dict[str, Any], factor: float, min_lr: float, eps: float) -> tuple[float, float]:
        """Cut one group's LR as ReduceLROnPlateau would; returns (LR in effect before, after)."""
        cut = self.cuts.get(id(group))
        script_lr = _script_lr(group, cut)
        before = cut.for_script_lr(script_lr) if cut is not None else script_lr
        after = reduced_lr(before, factor, min_lr, eps)
        if after != before:
            self.cuts[id(group)] = GroupCut(group, script_lr, after, min_lr, cut.saved if cut else None)
        return before, after

    def in_effect(self, group: dict[str, Any]) -> Any:
        """The LR the group's next (or current) update uses: a float, or a tensor for a tensor LR (read
        without a synchronisation)."""
        lr = group["lr"]
        cut = self.cuts.get(id(group))
        if cut is None or cut.saved is not None:  # never cut, or set for the update now
            return lr
        if isinstance(lr, torch.Tensor):
            return torch.minimum(lr, (lr * cut.ratio).clamp(min=cut.min_lr))
        return cut.for_script_lr(float(lr))

    def ratio_of(self, group: dict[str, Any]) -> tuple[float, float] | None:
        """The group's cut as (ratio, min_lr), None when never cut."""
        cut = self.cuts.get(id(group))
        return None if cut is None else (cut.ratio, cut.min_lr)

    def without(self, group: dict[str, Any], old: tuple[float, float] | None) -> float:
        """The LR the group's update would use under the cut ``old`` (from :meth:`ratio_of`) instead."""
        lr = _script_lr(group, self.cuts.get(id(group)))
        if old is None:
            return lr
        ratio, min_lr = old
        return min(lr, max(lr * ratio, min_lr))

    # -- saved with the probe's state (probe.state_dict) ---------------------------------------------
    def state_dict(self, groups: list[dict[str, Any]]) -> list[list[float]]:
        """The cuts as [index of the group in ``groups``, script LR, cut LR, min_lr]: JSON, by position."""
        return [[i, cut.script_lr, cut.cut_lr, cut.min_lr] for i, group in enumerate(groups)
                if (cut := self.cuts.get(id(group))) is not None]

    def load_state_dict(self, state: list[list[float]], groups: list[dict[str, Any]]) -> None:
        for index, script_lr, cut_lr, min_lr in state:
            if 0 <= int(index) < len(groups):
                group = groups[int(index)]
                self.cuts[id(group)] = GroupCut(group, float(script_lr), float(cut_lr), float(min_lr))

    # -- around an optimizer's update --------------------------------------------------------------
    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Just before ``optimizer`` updates: its cut groups get their cut LR."""
        for group in optimizer.param_groups:
            cut = self.cuts.get(id(group))
            if cut is None or cut.saved is not None:
                continue
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):  # capturable / compiled optimizers: the tensor is shared, edit in place
                cut.saved = lr.clone()
                lr.mul_(cut.ratio).clamp_(min=cut.min_lr)
                torch.minimum(lr, cut.saved, out=lr)
            else:
                cut.saved = lr
                group["lr"] = cut.for_script_lr(float(lr))

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Just after the update: the script's own values back."""
        for group in optimizer.param_groups:
            cut = self.cuts.get(id(group))
            if cut is None or cut.saved is None:
                continue
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].copy_(cut.saved)
            else:
                group["lr"] = cut.saved
            cut.saved = None

    def hook(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer other than the probe's own: its step hooks apply and restore the cut."""
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))
        self._hooks.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.apply(opt)))
        self._hooks.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore(opt)))

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _script_lr(group: dict[str, Any], cut: GroupCut | None) -> float:
    if cut is not None and cut.saved is not None:
        return float(cut.saved)
    return float(group["lr"])
