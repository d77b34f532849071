"""What a script's own calls tell the probe when nobody calls ``probe.log``: the loss (the scalar
tensor the backward pass starts from), the result of its ``clip_grad_norm_`` call, and the
GradScaler's scaling of the loss.

Used by the zero-code launcher and the Transformers callback. The wrappers are installed once per
process and stay; with no probe listening they cost one list check. Each wrapper calls torch's
original unchanged; our part runs under ``try`` and can never fail the call.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

if TYPE_CHECKING:
    from gradwatch.probes.probe import Probe

log = logging.getLogger("gradwatch")

_taps: list[StepInputs] = []
_install_lock = threading.Lock()
_reported: set[str] = set()
_installed = False
_scaled: tuple[weakref.ref[torch.Tensor], torch.Tensor] | None = None  # last GradScaler.scale: (output, loss)


class StepInputs:
    """The loss backpropagated since the probe's last optimizer step, and the script's clip result.

    With gradient accumulation the loss is the sum of the scalars backpropagated between two steps:
    the gradient the step applies is that sum's gradient. A script that divides each micro-batch
    loss by the number of micro-batches (the usual way, and the Trainer's) therefore records the
    mean loss of the step.
    """

    def __init__(self, probe: Probe | None = None) -> None:
        self.probe = probe
        self.loss: Any = None
        self._clip: tuple[torch.Tensor, int] | None = None  # held until a probe exists (zero-code's first step)

    def bind(self, probe: Probe) -> None:
        self.probe = probe
        probe.use_step_inputs(self)
        if self._clip is not None:
            probe.reuse_clip_norm(*self._clip)
            self._clip = None

    def on_backward(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.loss = loss if self.loss is None else self.loss + loss
        # new gradients: an earlier clip result no longer describes them
        if self.probe is not None:
            self.probe.forget_clip_norm()
        self._clip = None

    def on_clip(self, total_norm: torch.Tensor, n_gradients: int) -> None:
        if self.probe is not None:
            self.probe.reuse_clip_norm(total_norm, n_gradients)
        else:
            self._clip = (total_norm, n_gradients)

    def take_loss(self) -> Any:
        loss, self.loss = self.loss, None
        return loss


def listen(probe: Probe | None = None) -> StepInputs:
    """Collect the loss and clip results of this process's training (installs the wrappers), for
    ``probe``, or for the probe bound later with ``StepInputs.bind``."""
    _install()
    inputs = StepInputs()
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
        original_scale = torch.amp.GradScaler.scale

        def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
            if _taps and grad_tensors is None:
                _seen_backward(tensors)
            return original_backward(tensors, grad_tensors, *args, **kwargs)

        def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0, *args: Any,
                            **kwargs: Any) -> torch.Tensor:
            if not _taps or float(norm_type) != 2.0:
                return original_clip(parameters, max_norm, norm_type, *args, **kwargs)
            parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            total = original_clip(parameters, max_norm, norm_type, *args, **kwargs)
            _seen_clip(total, parameters)
            return total

        def scale(self: torch.amp.GradScaler, outputs: Any) -> Any:
            scaled = original_scale(self, outputs)
            if _taps and isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor):
                _seen_scale(scaled, outputs)
            return scaled

        wrappers: tuple[tuple[Any, Any], ...] = ((backward, original_backward), (clip_grad_norm_, original_clip),
                                                 (scale, original_scale))
        for wrapper, original in wrappers:
            wrapper.__wrapped__ = original  # functools.wraps without copying the signature's annotations
            wrapper.__doc__ = original.__doc__
        torch.autograd.backward = backward
        torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
        torch.nn.utils.clip_grad.clip_grad_norm_ = clip_grad_norm_
        torch.amp.GradScaler.scale = scale  # type: ignore[method-assign]


def _seen_backward(tensors: Any) -> None:
    global _scaled  # noqa: PLW0603 - one per process: torch's hooks and functions are process-wide
    try:
        if not isinstance(tensors, torch.Tensor):
            if not isinstance(tensors, (list, tuple)) or len(tensors) != 1:
                return
            tensors = tensors[0]
        if tensors.numel() != 1 or not tensors.is_floating_point():
            return
        loss = tensors
        if _scaled is not None:
            output, unscaled = _scaled
            if output() is tensors:
                loss = unscaled  # GradScaler's scaled loss: record the loss the script computed
            _scaled = None
        for tap in _taps:
            tap.on_backward(loss)
    except Exception as exc:  # never fail the script's backward
        _internal_error("backward", exc)


def _seen_clip(total: torch.Tensor, parameters: Iterable[torch.Tensor]) -> None:
    try:
        n_gradients = sum(1 for p in parameters if p.grad is not None)
        for tap in _taps:
            tap.on_clip(total, n_gradients)
    except Exception as exc:
        _internal_error("clip_grad_norm_", exc)


def _seen_scale(scaled: torch.Tensor, loss: torch.Tensor) -> None:
    global _scaled  # noqa: PLW0603 - one per process: torch's hooks and functions are process-wide
    try:
        _scaled = (weakref.ref(scaled), loss.detach())
    except Exception as exc:
        _internal_error("GradScaler.scale", exc)


def _internal_error(where: str, exc: Exception) -> None:
    probes = [tap.probe for tap in _taps if tap.probe is not None]
    for probe in probes:
        probe.report_internal_error(where, exc)  # counted and reported once by the probe
    if not probes and where not in _reported:  # before the zero-code probe exists
        _reported.add(where)
        log.warning("gradwatch: internal error in the %s wrapper (%r); training goes on", where, exc)
