"""Carrying out what guards and commands decide, on the training thread: clip, skip, change the
learning rate, rewind. Deciding happens elsewhere (probes/guards.py, the agent's rules).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.probes import readback
from gradwatch.probes.captures import GuardInfo
from gradwatch.probes.control import Command
from gradwatch.probes.gradnorm import GradNormMeter, NormOfNorms
from gradwatch.probes.guards import GradientGuards
from gradwatch.probes.optimizers import OptimizerSet
from gradwatch.probes.snapshots import Snapshots
from gradwatch.rules.lr import min_lr_for, reduced_lr

if TYPE_CHECKING:
    from gradwatch.rules.config import ReduceLR


class Actuator:
    def __init__(self, optimizers: OptimizerSet, meter: GradNormMeter, guards: GradientGuards,
                 snapshots: Snapshots | None) -> None:
        self.optimizers = optimizers
        self.optimizer = optimizers.primary  # the one whose step the probe counts
        self.schedulers: list[Any] = []  # LR schedulers whose base_lrs follow an LR reduction
        self.external_clip: Callable[[float, float, float], float] | None = None  # a framework's clipping
        self.meter = meter
        self.guards = guards
        self.snapshots = snapshots
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._found_inf_set = False
        self.fast = guards.only_nonfinite_skip

    # -- guards, in the pre-step hook -----------------------------------------------------------
    def guard(self, norm: torch.Tensor | NormOfNorms) -> tuple[Any, GuardInfo | None]:
        """Apply the guards to this step's gradients; returns the norm to record and what was done."""
        if isinstance(norm, NormOfNorms):
            value = norm.value_now()  # CPU: reading it costs no synchronisation
        elif norm.is_cpu or self.guards.needs_host_norm:
            value = float(norm)  # on CUDA: the one synchronisation attach() warned about
        else:
            return norm, self._guard_on_device(norm)
        if self.fast and math.isfinite(value):
            return value, None  # the default guards and a healthy step: nothing to do, nothing to record
        decision = self.guards.decide(value)
        self.fast = self.guards.only_nonfinite_skip
        if decision.skip is not None:
            self._hide_gradients()
        elif decision.clipped:
            self._scale_gradients(decision.coef)
        return value, (decision.threshold, decision.clipped, decision.skip, decision.observed_skip)

    def _grads(self) -> list[torch.Tensor]:
        return [g for p in self.meter.params if (g := p.grad) is not None]

    def _scale_gradients(self, coef: float | torch.Tensor) -> None:
        grads = self._grads()
        if self.meter.fusable:
            torch._foreach_mul_(grads, coef)
        else:
            for g in grads:
                g.mul_(coef.to(g.device) if isinstance(coef, torch.Tensor) else coef)

    def _hide_gradients(self) -> None:
        """Skip the update: torch's optimizers leave parameters without a gradient untouched (no
        moment update, no weight decay, no step count). The gradients come back after the step."""
        self._hidden = [(p, g) for p in self.meter.params if (g := p.grad) is not None]
        for p, _ in self._hidden:
            p.grad = None

    def _guard_on_device(self, norm: torch.Tensor) -> GuardInfo:
        """CUDA without a synchronisation: the fixed threshold as a clamp, the non-finite skip through
        the fused optimizers' ``found_inf`` (as GradScaler does); otherwise the skip only observes."""
        g = self.guards
        threshold, clipped, skip, observed = None, False, None, None
        if g.scheme == "fixed" and g.fixed_threshold is not None:
            threshold = g.fixed_threshold
            if g.clip_mode == "act":
                self._scale_gradients(torch.clamp(threshold / (norm + 1e-6), max=1.0))
            clipped = readback.capture(norm > threshold)
        if g.skip_nonfinite != "off":
            found = (~torch.isfinite(norm)).float()
            if g.skip_nonfinite == "act" and getattr(self.optimizer, "_step_supports_amp_scaling", False):
                existing = getattr(self.optimizer, "found_inf", None)
                # the fused optimizers skip their update where found_inf is set, as under GradScaler
                setattr(self.optimizer, "found_inf", found if existing is None else torch.maximum(existing, found))  # noqa: B010 - undeclared attribute
                self._found_inf_set = existing is None
                skip = readback.capture(found)
            else:
                observed = readback.capture(found)
        return threshold, clipped, skip, observed

    # -- after the step ---------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        if self._hidden:
            for p, g in self._hidden:
                p.grad = g
            self._hidden = []
        if self._found_inf_set:
            delattr(self.optimizer, "found_inf")  # not an attribute torch declares: set above, removed here
            self._found_inf_set = False
        if self.snapshots is not None:
            self.snapshots.maybe_take(step)

    # -- commands of the agent -------------------------------------------------------------------
    def execute(self, command: Command) -> str:
        """Carry out one command (not stop: the probe does that); returns a short description.
        ValueError: refused, nothing changed."""
        from gradwatch.rules.config import ReduceLR, Rewind, ScaleClip  # loaded by attach(); kept off import

        action = command.action
        if isinstance(action, ReduceLR):
            return self._reduce_lr(action)
        if isinstance(action, ScaleClip):
            if self.external_clip is not None:
                new = self.external_clip(action.factor, action.min_max_norm, action.max_max_norm)
                return f"the trainer's clip threshold now {new:.6g}"
            new = self.guards.scale_fixed_threshold(action.factor, action.min_max_norm, action.max_max_norm)
            return f"clip threshold now {new:.6g}"
        if isinstance(action, Rewind):
            if self.snapshots is None:
                raise ValueError("rewind needs snapshots: give a rewind rule mode 'act' in the rules the probe "
                                 "was attached with, or set guards.snapshots.enabled: true")
            restored = self.snapshots.restore(before_step=command.trigger_step - action.min_back_steps + 1)
            self.guards.skip_next += action.skip_steps
            self.fast = self.guards.only_nonfinite_skip
            return f"restored the snapshot of step {restored}; skipping the next {action.skip_steps} updates"
        raise ValueError(f"unknown action {command.type!r}")

    def learning_rates(self) -> list[float]:
        """The LR of every watched param group, as set now."""
        return [float(group["lr"]) for group in self.optimizers.param_groups]

    def _reduce_lr(self, action: ReduceLR) -> str:
        changes = []
        for i, group in enumerate(self.optimizers.param_groups):
            old = group["lr"]
            old_value = float(old)
            new = reduced_lr(old_value, action.factor, min_lr_for(action.min_lr, i), action.eps)
            if new != old_value:
                if isinstance(old, torch.Tensor):
                    old.fill_(new)
                else:
                    group["lr"] = new
                self._scale_schedule(group, new / old_value if old_value else 1.0)
            changes.append(f"{old_value:.6g}->{new:.6g}")
        return "lr " + ", ".join(changes)

    def _scale_schedule(self, group: dict[str, Any], ratio: float) -> None:
        """Schedulers that compute the LR from their base LRs (LambdaLR, OneCycle...) would undo the
        reduction at their next step; scale their base LR of this group by the same ratio."""
        for scheduler in self.schedulers:
            groups = scheduler.optimizer.param_groups
            for j, candidate in enumerate(groups):
                if candidate is group and j < len(scheduler.base_lrs):
                    scheduler.base_lrs[j] *= ratio
                    max_lrs = getattr(scheduler, "max_lrs", None)  # CyclicLR's upper bounds
                    if isinstance(max_lrs, list) and j < len(max_lrs):
                        max_lrs[j] *= ratio
        for key in ("initial_lr", "max_lr", "min_lr"):  # OneCycleLR computes the LR from these
            if self.schedulers and isinstance(group.get(key), float):
                group[key] *= ratio
