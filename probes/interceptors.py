"""What a script's own calls tell the probe: the loss (the scalar tensor the backward pass starts
from) when nobody calls ``probe.log``, the end of each backward pass (the steps of a script that
updates its parameters by hand), the result and threshold of its ``clip_grad_norm_`` call and the
norm before its ``clip_grad_value_`` (the recorded norm is the one before clipping), the GradScaler's
scaling of the loss, and the steps GradScaler skips.

Used by ``attach`` (without the loss), the zero-code launcher and the Transformers callback. The wrappers are installed once per
process and stay; with no probe listening they cost one list check. Each wrapper calls torch's
original unchanged; our part runs under ``try`` and can never fail the call.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad
from torch.amp.grad_scaler import OptState

from gradwatch.probes.gradnorm import global_grad_norm, replicated_local, sharded

if TYPE_CHECKING:
    from gradwatch.probes.probe import Probe

log = logging.getLogger("gradwatch")

_taps: list[StepInputs] = []
_install_lock = threading.Lock()
_reported: set[str] = set()
_installed = False
_scaled: tuple[weakref.ref[torch.Tensor], torch.Tensor] | None = None  # last GradScaler.scale: (output, loss)
_scaler: weakref.ref[torch.amp.GradScaler] | None = None  # the GradScaler that scaled the last loss


class StepInputs:
    """The loss backpropagated since the probe's last optimizer step, and the script's clip result.

    With gradient accumulation the loss is the sum of the scalars backpropagated between two steps:
    the gradient the step applies is that sum's gradient. A script that divides each micro-batch
    loss by the number of micro-batches (the usual way, and the Trainer's) therefore records the
    mean loss of the step.
    """

    def __init__(self, probe: Probe | None = None, *, record_loss: bool = True) -> None:
        self.probe = probe
        self.record_loss = record_loss  # False under attach: the script logs its loss itself
        self.loss: Any = None
        self.backward_passes = 0
        self._last_loss: Any = None
        self._first_loss_only = False  # within optimizer.step(closure)
        self.unbound_backward: Callable[[], None] | None = None  # zero-code: a backward pass before any probe
        # zero-code: GradScaler skipped the first step (fp16 runs often start so), before any probe
        self.unbound_scaler_step: Callable[[torch.optim.Optimizer, torch.amp.GradScaler], None] | None = None
        # held until a probe exists (zero-code's first step): (norm, gradients, max_norm or None)
        self._clip: tuple[torch.Tensor, int, float | None] | None = None

    def bind(self, probe: Probe) -> None:
        self.probe = probe
        if self.record_loss:
            probe.use_step_inputs(self)
        if self._clip is not None:
            probe.reuse_clip_norm(*self._clip)
            self._clip = None

    def start_closure_step(self) -> None:
        """``optimizer.step(closure)`` begins: the step's loss is its closure's first one (what ``step()``
        returns; LBFGS evaluates the closure again on each iteration), not their sum."""
        self.loss = None
        self._first_loss_only = True

    def on_backward(self, loss: torch.Tensor) -> None:
        if self.record_loss and not (self._first_loss_only and self.loss is not None):
            loss = loss.detach().float()  # fp16/bf16 micro-batch losses summed in their dtype lose ~1e-3: float32
            self.loss = loss if self.loss is None else self.loss + loss
        # new gradients: an earlier clip result no longer describes them
        if self.probe is not None:
            self.probe.forget_clip_norm()
        self._clip = None

    def on_backward_done(self) -> None:
        self.backward_passes += 1
        if self.probe is not None:
            self.probe.backward_done()
        elif self.unbound_backward is not None:
            self.unbound_backward()

    def on_clip(self, total_norm: torch.Tensor, n_gradients: int, max_norm: float | None) -> None:
        if self.probe is not None:
            self.probe.reuse_clip_norm(total_norm, n_gradients, max_norm)
        else:
            self._clip = (total_norm, n_gradients, max_norm)

    def on_scaler_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, stepped_before: int) -> None:
        if self.probe is not None:
            self.probe.scaler_stepped(optimizer, scaler, stepped_before)
        elif self.unbound_scaler_step is not None:
            self.unbound_scaler_step(optimizer, scaler)

    def take_loss(self) -> Any:
        loss, self.loss = self.loss, None
        self._first_loss_only = False
        if loss is not None:
            self._last_loss = loss
        return loss

    def take_loss_or_last(self) -> Any:
        """For another optimizer of the run: the backward passes since the last step of any optimizer, or,
        when none came since (one backward, then several optimizers), the loss the last step took."""
        loss = self.take_loss()
        return loss if loss is not None else self._last_loss


def listen(probe: Probe | None = None, *, record_loss: bool = True) -> StepInputs:
    """Collect the loss and clip results of this process's training (installs the wrappers), for
    ``probe``, or for the probe bound later with ``StepInputs.bind``."""
    _install()
    inputs = StepInputs(record_loss=record_loss)
    _taps.append(inputs)
    if probe is not None:
        inputs.bind(probe)
    return inputs


def stop_listening(inputs: StepInputs) -> None:
    if inputs in _taps:
        _taps.remove(inputs)


# -- the wrappers -------------------------------------------------------------------------------
def _install() -> None:
    global _installed  # noqa: PLW0603 - one per process: torch's hooks and functions are process-wide
    with _install_lock:
        if _installed:
            return
        _installed = True
        original_backward = torch.autograd.backward
        original_clip = torch.nn.utils.clip_grad.clip_grad_norm_
        original_clip_value = torch.nn.utils.clip_grad.clip_grad_value_
        # torch >= 2.6: a norm computed apart (get_total_norm) and then applied. Accelerate >= 1.16 clips this way,
        # and so the Transformers Trainer; torch's own clip_grad_norm_ calls the private function, not this name
        original_clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
        original_scale = torch.amp.GradScaler.scale
        original_scaler_step = torch.amp.GradScaler.step

        def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
            if not _taps or grad_tensors is not None:
                return original_backward(tensors, grad_tensors, *args, **kwargs)
            is_loss = _seen_backward(tensors)
            result = original_backward(tensors, grad_tensors, *args, **kwargs)
            if is_loss:
                _seen_backward_done()
            return result

        def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0, *args: Any,
                            **kwargs: Any) -> torch.Tensor:
            if not _taps or float(norm_type) != 2.0:
                return original_clip(parameters, max_norm, norm_type, *args, **kwargs)
            parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            max_norm = _before_clip(max_norm)
            total = original_clip(parameters, max_norm, norm_type, *args, **kwargs)
            _seen_clip(total, parameters, max_norm)
            return total

        def clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: torch.Tensor, *args: Any,
                                  **kwargs: Any) -> Any:
            assert original_clip_with_norm is not None
            if not _taps:
                return original_clip_with_norm(parameters, max_norm, total_norm, *args, **kwargs)
            parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            max_norm = _before_clip(max_norm)
            result = original_clip_with_norm(parameters, max_norm, total_norm, *args, **kwargs)
            _seen_clip(total_norm, parameters, max_norm)
            return result

        def clip_grad_value_(parameters: Any, clip_value: float, *args: Any, **kwargs: Any) -> Any:
            if not _taps:
                return original_clip_value(parameters, clip_value, *args, **kwargs)
            parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            _before_clip(None)
            _seen_clip_value(parameters)  # the norm before the values are clamped
            return original_clip_value(parameters, clip_value, *args, **kwargs)

        def scale(self: torch.amp.GradScaler, outputs: Any) -> Any:
            scaled = original_scale(self, outputs)
            if _taps and isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor):
                _seen_scale(self, scaled, outputs)
            return scaled

        def scaler_step(self: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if not _taps:
                return original_scaler_step(self, optimizer, *args, **kwargs)
            before = [tap.probe.step if tap.probe is not None else 0 for tap in _taps]
            result = original_scaler_step(self, optimizer, *args, **kwargs)
            _seen_scaler_step(self, optimizer, before)
            return result

        wrappers: tuple[tuple[Any, Any], ...] = (
            (backward, original_backward), (clip_grad_norm_, original_clip), (clip_grad_value_, original_clip_value),
            (scale, original_scale), (scaler_step, original_scaler_step))
        for wrapper, original in wrappers:
            wrapper.__wrapped__ = original  # functools.wraps without copying the signature's annotations
            wrapper.__doc__ = original.__doc__
        torch.autograd.backward = backward
        torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
        torch.nn.utils.clip_grad.clip_grad_norm_ = clip_grad_norm_
        torch.nn.utils.clip_grad_value_ = clip_grad_value_
        torch.nn.utils.clip_grad.clip_grad_value_ = clip_grad_value_
        if original_clip_with_norm is not None:
            clip_grads_with_norm_.__wrapped__ = original_clip_with_norm  # type: ignore[attr-defined]
            clip_grads_with_norm_.__doc__ = original_clip_with_norm.__doc__
            torch.nn.utils.clip_grads_with_norm_ = clip_grads_with_norm_
        torch.amp.GradScaler.scale = scale  # type: ignore[method-assign]
        torch.amp.GradScaler.step = scaler_step  # type: ignore[method-assign]


def _seen_backward(tensors: Any) -> bool:
    """A backward pass starts; True when it starts from a scalar loss (a training step's backward)."""
    global _scaled  # noqa: PLW0603 - one per process: torch's hooks and functions are process-wide
    try:
        if not isinstance(tensors, torch.Tensor):
            if not isinstance(tensors, (list, tuple)) or len(tensors) != 1:
                return False
            tensors = tensors[0]
        if tensors.numel() != 1 or not tensors.is_floating_point():
            return False
        loss = tensors
        if _scaled is not None:
            output, unscaled = _scaled
            if output() is tensors:
                loss = unscaled  # GradScaler's scaled loss: record the loss the script computed
            _scaled = None
        for tap in _taps:
            tap.on_backward(loss)
        return True
    except Exception as exc:  # never fail the script's backward
        _internal_error("backward", exc)
        return False


def _seen_backward_done() -> None:
    try:
        for tap in list(_taps):
            tap.on_backward_done()
    except Exception as exc:
        _internal_error("backward", exc)


def _before_clip(max_norm: Any) -> Any:
    """The script clips: the probes measure what must be seen before clipping; the max_norm to clip at."""
    try:
        for tap in _taps:
            if tap.probe is not None:
                max_norm = tap.probe.before_script_clip(max_norm)
    except Exception as exc:
        _internal_error("clip_grad_norm_", exc)
    return max_norm


def _seen_clip(total: torch.Tensor, parameters: Iterable[torch.Tensor], max_norm: Any) -> None:
    try:
        total = replicated_local(total)  # FSDP2: the global norm, on every rank
        n_gradients = sum(1 for p in parameters if p.grad is not None)
        threshold = float(max_norm) if max_norm is not None and not isinstance(max_norm, torch.Tensor) else None
        for tap in _taps:
            tap.on_clip(total, n_gradients, threshold)
    except Exception as exc:
        _internal_error("clip_grad_norm_", exc)


def _seen_clip_value(parameters: list[torch.Tensor]) -> None:
    try:
        grads = [p.grad for p in parameters if p.grad is not None]
        if any(sharded(g) for g in grads):
            return  # FSDP2: a local norm is not the global one, and the probe issues no collective
        total = global_grad_norm(grads)
        if total is not None:
            for tap in _taps:
                tap.on_clip(total, len(grads), None)
    except Exception as exc:
        _internal_error("clip_grad_value_", exc)


def _seen_scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, before: list[int]) -> None:
    try:
        for tap, stepped_before in zip(list(_taps), before, strict=False):
            tap.on_scaler_step(optimizer, scaler, stepped_before)
    except Exception as exc:
        _internal_error("GradScaler.step", exc)


def _seen_scale(scaler: torch.amp.GradScaler, scaled: torch.Tensor, loss: torch.Tensor) -> None:
    global _scaled, _scaler  # noqa: PLW0603 - one per process: torch's hooks and functions are process-wide
    try:
        _scaled = (weakref.ref(scaled), loss.detach())
        if _scaler is None or _scaler() is not scaler:
            _scaler = weakref.ref(scaler)
    except Exception as exc:
        _internal_error("GradScaler.scale", exc)


def outstanding_scale(optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None = None) -> torch.Tensor | None:
    """The loss scale the optimizer's gradients still carry, outside its ``step()``: a GradScaler scaled the backward
    pass and has not unscaled them for this optimizer. A fused optimizer unscales inside ``step()``, so Lightning's
    ``on_before_optimizer_step`` (16-mixed) sees its gradients scaled: their norm is the scale (65,536) times too
    large. The scale is a device tensor: dividing by it is no synchronisation. None: they carry none. ``scaler``:
    the framework's (Lightning's precision plugin); else the one the interceptors saw scale the last loss."""
    if scaler is None:
        scaler = _scaler() if _scaler is not None else None
    if scaler is None or not scaler.is_enabled():
        return None
    states = getattr(scaler, "_per_optimizer_states", None)  # GradScaler's own: unscale_() and step() mark it
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    if state is not None and state.get("stage") is not OptState.READY:
        return None  # unscaled (unscale_, a non-fused optimizer under GradScaler.step) or stepped already
    return scaler._get_scale_async()


def _internal_error(where: str, exc: Exception) -> None:
    probes = list({id(tap.probe): tap.probe for tap in _taps if tap.probe is not None}.values())  # each once
    for probe in probes:
        probe.report_internal_error(where, exc)  # counted and reported once by the probe
    if not probes and where not in _reported:  # before the zero-code probe exists
        _reported.add(where)
        log.warning("gradwatch: internal error in the %s wrapper (%r); training goes on", where, exc)
