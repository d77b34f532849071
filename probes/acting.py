"""Carrying out what guards and commands decide, on the training thread: clip, skip, change the
learning rate, rewind. Deciding happens elsewhere (probes/guards.py, the agent's rules).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.probes.captures import GuardInfo
from gradwatch.probes.control import Command
from gradwatch.probes.gradnorm import GradNormMeter, NormOfNorms
from gradwatch.probes.guards import GradientGuards
from gradwatch.probes.lr_cut import LRCut
from gradwatch.probes.optimizers import OptimizerSet
from gradwatch.probes.snapshots import Snapshots
from gradwatch.rules.clip import scaled_threshold
from gradwatch.rules.lr import min_lr_for

if TYPE_CHECKING:
    from gradwatch.rules.config import ReduceLR


def device_clip_coef(threshold: float, norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_``'s coefficient on the device, without a synchronisation: ``threshold / norm`` at most
    1, and 1 for a non-finite norm, as the host path does (a NaN coefficient would make every gradient NaN; a
    step with a non-finite norm is the skip guard's)."""
    coef = torch.clamp(threshold / (norm + 1e-6), max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


class Actuator:
    def __init__(self, optimizers: OptimizerSet, meter: GradNormMeter, guards: GradientGuards,
                 snapshots: Snapshots | None) -> None:
        self.optimizers = optimizers
        self.optimizer = optimizers.primary  # the one whose step the probe counts
        self.lr_cut = LRCut()  # LR reductions, held as ratios to the LR the script sets
        self.external_clip: Callable[[float, float, float], float] | None = None  # a framework's clipping
        self.expected_clip_threshold: float | None = None  # what the next clip uses, after a scale_clip
        self.script_clip_seen: float | None = None  # the max_norm of the script's own clip_grad_norm_, last seen
        self._script_clip: tuple[float, float, float] | None = None  # scale_clip on it: (ratio, low, high)
        self.pending_external_clip: float | None = None  # a resumed run's framework clip threshold, to set again
        self.meter = meter
        self.guards = guards
        self.snapshots = snapshots
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._found_inf_set: torch.Tensor | None = None  # the found_inf the probe put on the optimizer
        self.fast = guards.only_nonfinite_skip

    # -- guards, in the pre-step hook -----------------------------------------------------------
    def guard(self, norm: torch.Tensor | NormOfNorms, amp: bool = False) -> tuple[Any, GuardInfo | None]:
        """Apply the guards to this step's gradients; returns the norm to record and what was done. ``amp``: a
        GradScaler steps this optimizer, and skips a step with non-finite gradients itself (lowering its scale;
        recorded as skip "amp"): the guards leave those to it. Hiding the gradients from it would leave it no
        inf check to record, and its ``update()`` raise."""
        if isinstance(norm, NormOfNorms):
            value = norm.value_now()  # CPU: reading it costs no synchronisation
        elif norm.is_cpu or self.guards.needs_host_norm:
            value = float(norm)  # on CUDA: the one synchronisation attach() warned about
        else:
            return norm, self._guard_on_device(norm, amp)
        if self.fast and math.isfinite(value):
            return value, None  # the default guards and a healthy step: nothing to do, nothing to record
        if amp and not math.isfinite(value):
            return value, None  # GradScaler's to skip
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

    def _guard_on_device(self, norm: torch.Tensor, amp: bool = False) -> GuardInfo:
        """CUDA without a synchronisation: the fixed threshold as a clamp, the non-finite skip through
        the fused optimizers' ``found_inf`` (as GradScaler does); otherwise the skip only observes."""
        g = self.guards
        threshold: float | None = None
        clipped: bool | torch.Tensor = False
        skip: torch.Tensor | None = None
        observed: torch.Tensor | None = None
        if g.scheme == "fixed" and g.fixed_threshold is not None:
            threshold = g.fixed_threshold
            if g.clip_mode == "act":
                self._scale_gradients(device_clip_coef(threshold, norm))
            clipped = norm > threshold  # device tensors: the step's batch reads them back (probes/readback.py)
        if g.skip_nonfinite != "off" and not amp:  # under GradScaler, non-finite steps are its own to skip
            found = (~torch.isfinite(norm)).float()
            if g.skip_nonfinite == "act" and getattr(self.optimizer, "_step_supports_amp_scaling", False):
                existing = getattr(self.optimizer, "found_inf", None)
                # the fused optimizers skip their update where found_inf is set, as under GradScaler
                combined = found if existing is None else torch.maximum(existing, found)
                setattr(self.optimizer, "found_inf", combined)  # noqa: B010 - undeclared attribute
                self._found_inf_set = combined if existing is None else None
                skip = found
            else:
                observed = found
        return threshold, clipped, skip, observed

    def owns_found_inf(self, found: torch.Tensor) -> bool:
        return found is self._found_inf_set

    # -- after the step ---------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        if self._hidden:
            for p, g in self._hidden:
                p.grad = g
            self._hidden = []
        if self._found_inf_set is not None:
            # only the probe's own: GradScaler.step() (after a framework's pre-step hook, as in Lightning's
            # 16-mixed) replaces it with its own found_inf, and deletes that itself after the step
            if getattr(self.optimizer, "found_inf", None) is self._found_inf_set:
                delattr(self.optimizer, "found_inf")  # not an attribute torch declares: set above, removed here
            self._found_inf_set = None
        if self.snapshots is not None:
            self.snapshots.maybe_take(step)

    # -- commands of the agent -------------------------------------------------------------------
    def execute(self, command: Command) -> str:
        """Carry out one command (not stop: the probe does that); returns a short description.
        ValueError: refused, nothing changed."""
        from gradwatch.rules.config import ReduceLR, Rewind, ScaleClip  # loaded by attach(); kept off import

        action = command.action
        if isinstance(action, ReduceLR):
            return self._reduce_lr(action, command.optimizer)
        if isinstance(action, ScaleClip):
            return self._scale_clip(action.factor, action.min_max_norm, action.max_max_norm)
        if isinstance(action, Rewind):
            if self.snapshots is None:
                raise ValueError("rewind needs snapshots: give a rewind rule mode 'act' in the rules the probe "
                                 "was attached with, or set guards.snapshots.enabled: true")
            cuts = self.lr_cut.state_dict(self.optimizers.param_groups)
            restored = self.snapshots.restore(before_step=command.trigger_step - action.min_back_steps + 1)
            if cuts:  # load_state_dict made new param-group dicts: the LR cuts in force follow them, by position
                self.lr_cut.cuts.clear()
                self.lr_cut.load_state_dict(cuts, self.optimizers.param_groups)
            self.guards.skip_next += action.skip_steps
            self.fast = self.guards.only_nonfinite_skip
            return f"restored the snapshot of step {restored}; skipping the next {action.skip_steps} updates"
        raise ValueError(f"unknown action {command.type!r}")

    def _scale_clip(self, factor: float, low: float, high: float) -> str:
        """Scale the threshold of whatever clips: the framework's, gradwatch's fixed guard, or the script's
        own ``clip_grad_norm_`` (the interceptor hands it the scaled max_norm)."""
        if self.external_clip is not None:
            new = self.expected_clip_threshold = self.external_clip(factor, low, high)
            return f"the trainer's clip threshold now {new:.6g}"
        if self.guards.scheme == "fixed" and self.guards.fixed_threshold is not None:
            new = self.expected_clip_threshold = self.guards.scale_fixed_threshold(factor, low, high)
            return f"clip threshold now {new:.6g}"
        seen = self.script_clip_seen
        if seen is None or seen <= 0:
            raise ValueError("scale_clip: nothing clips this run's gradients by norm (no clip_grad_norm_ call seen, "
                             "and guards.clip.scheme is not 'fixed')")
        current = self._scaled_script_clip(seen)
        new = self.expected_clip_threshold = scaled_threshold(current, factor, low, high)
        self._script_clip = (new / seen, low, high)
        return f"the script's clip threshold now {new:.6g} (it passes {seen:.6g})"

    def script_clip_threshold(self, max_norm: float) -> float:
        """The max_norm the script's ``clip_grad_norm_`` clips at: its own, scaled by scale_clip commands."""
        self.script_clip_seen = max_norm
        return self._scaled_script_clip(max_norm) if self._script_clip is not None else max_norm

    def _scaled_script_clip(self, max_norm: float) -> float:
        if self._script_clip is None:
            return max_norm
        ratio, low, high = self._script_clip
        return scaled_threshold(max_norm, ratio, low, high)

    # -- saved with the probe's state (probe.state_dict) ---------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The actions in force: LR cuts, the guards' statistics and thresholds, a scaled clip threshold."""
        return {"lr_cut": self.lr_cut.state_dict(self.optimizers.param_groups), "guards": self.guards.state_dict(),
                "script_clip": list(self._script_clip) if self._script_clip is not None else None,
                "external_clip": self.expected_clip_threshold if self.external_clip is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_cut.load_state_dict(state.get("lr_cut") or [], self.optimizers.param_groups)
        if self.lr_cut:
            for member in self.optimizers.members[1:]:
                self.lr_cut.hook(member)
        self.guards.load_state_dict(state.get("guards") or {})
        self.fast = self.guards.only_nonfinite_skip
        clip = state.get("script_clip")
        if isinstance(clip, list) and len(clip) == 3:
            self._script_clip = (float(clip[0]), float(clip[1]), float(clip[2]))
        external = state.get("external_clip")
        self.pending_external_clip = float(external) if isinstance(external, (int, float)) else None

    def learning_rates(self) -> list[float]:
        """The LR the next update of every watched param group uses (the script's, times the cuts)."""
        cut = self.lr_cut
        return [float(cut.in_effect(group)) if cut else float(group["lr"]) for group in self.optimizers.param_groups]

    def _reduce_lr(self, action: ReduceLR, optimizer: str = "") -> str:
        """Cut the LR of every watched optimizer, or of the one named ("0": the first, "1"...)."""
        groups = self.optimizers.param_groups
        if optimizer:
            members = self.optimizers.members
            if not optimizer.isdigit() or int(optimizer) >= len(members):
                raise ValueError(f"reduce_lr for optimizer {optimizer!r}: this run has optimizers "
                                 f"{', '.join(str(i) for i in range(len(members)))}")
            groups = members[int(optimizer)].param_groups
        changes = []
        changed = False
        for i, group in enumerate(groups):
            before, after = self.lr_cut.reduce(group, action.factor, min_lr_for(action.min_lr, i), action.eps)
            changed = changed or after != before
            changes.append(f"{before:.6g}->{after:.6g}")
        if not changed:
            raise NotTaken("lr " + ", ".join(changes) + ": every group's LR is at min_lr already")
        for member in self.optimizers.members[1:]:  # the probe's own step hooks apply it to the primary
            self.lr_cut.hook(member)
        return "lr " + ", ".join(changes)


class NotTaken(Exception):
    """A command that was carried out but changes nothing (an LR cut at min_lr): acknowledged as such."""
