"""Move scalars from the training thread to the writer thread without a host-device sync.

On the training thread, ``capture()`` turns a value into something the writer thread can
finish later: a float for Python numbers and CPU tensors (reading a CPU tensor never
synchronises), or a pending copy for CUDA tensors: an asynchronous copy into pinned host
memory plus a CUDA event, which the writer thread polls with ``event.query()`` (not a sync).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from gradwatch.probes import graph_capture

NOT_READY = object()


class Deferred:
    """A value the writer thread finishes: ``resolve()`` gives a float, or NOT_READY to try again later."""

    __slots__ = ()

    def resolve(self) -> Any:
        raise NotImplementedError


def pinned(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def copy_to_host(value: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """An asynchronous copy of a CUDA tensor into pinned host memory, and an event that completes once it landed.
    The copy runs on the current stream of the tensor's own device, so the event is recorded there, not on the
    current device's (a script that moves tensors with ``.to(local_rank)`` without ``set_device``, or a model on
    several GPUs: an event on another device's stream completes before the copy, and the value read is garbage)."""
    host = pinned(value.shape, value.dtype)
    host.copy_(value, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(value.device))
    return host, event


class PendingDeviceValue(Deferred):
    """A scalar being copied from the GPU; ``resolve()`` returns NOT_READY until the copy landed."""

    __slots__ = ("event", "host")

    def __init__(self, value: torch.Tensor) -> None:
        self.host, self.event = copy_to_host(value.reshape(()))

    def resolve(self) -> Any:
        if graph_capture.active():
            return NOT_READY  # an event query now would invalidate a global-mode capture (probes/graph_capture.py)
        return float(self.host) if self.event.query() else NOT_READY


class DeferredTensor(Deferred):
    """A scalar on another accelerator (MPS, XLA...): read on the writer thread, off the training thread."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def resolve(self) -> Any:
        return float(self.value)


class PendingDeviceVector(Deferred):
    """A small vector being copied from the GPU; ``resolve()`` gives a list of floats once it landed."""

    __slots__ = ("event", "host")

    def __init__(self, value: torch.Tensor) -> None:
        self.host, self.event = copy_to_host(value)

    def resolve(self) -> Any:
        if graph_capture.active():
            return NOT_READY
        return self.host.tolist() if self.event.query() else NOT_READY


class DeviceFlag(Deferred):
    """A 0/1 tensor (GradScaler's ``found_inf``) read as ``name`` when set and None when not, without a sync."""

    __slots__ = ("name", "value")

    def __init__(self, value: torch.Tensor, name: str) -> None:
        self.value = capture(value)
        self.name = name

    def resolve(self) -> Any:
        value = resolve(self.value)
        return value if value is NOT_READY else self.name if value else None


class DeferredVector(Deferred):
    """A vector on the CPU (read on the writer thread) or another accelerator."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def resolve(self) -> Any:
        return self.value.tolist()


def capture_vector(value: torch.Tensor) -> Deferred:
    """A 1-D tensor gradwatch computed itself, handed to the writer thread without a synchronisation."""
    return PendingDeviceVector(value) if value.is_cuda else DeferredVector(value)


class NotAScalar(ValueError):
    pass


def capture(value: Any) -> Any:
    """Called on the training thread: cheap, never synchronises, never keeps an autograd graph alive."""
    if isinstance(value, torch.Tensor):
        if value.is_cpu:
            try:
                return value.item()  # one call; reading a CPU tensor never synchronises
            except RuntimeError:
                raise NotAScalar(f"expected a scalar, got a tensor of shape {tuple(value.shape)}") from None
        if value.numel() != 1:
            raise NotAScalar(f"expected a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.is_cuda:
            return PendingDeviceValue(value.detach())
        return DeferredTensor(value.detach())
    if isinstance(value, (int, float)):
        return float(value) if isinstance(value, bool) else value
    if isinstance(value, numbers.Real):  # numpy's scalars (float32, int64, bool_...) register as numbers
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d numpy array (np.mean(...) of some)
        item = value.item()
        if isinstance(item, numbers.Real):
            return float(item)
    raise NotAScalar(f"expected a number or a one-element tensor, got {type(value).__name__}")


def capture_owned(value: torch.Tensor | Deferred) -> Any:
    """Like capture(), for a value gradwatch computed itself and nobody mutates: a CPU tensor (or
    a Deferred) is handed over as it is and finished on the writer thread, saving the training
    thread a call."""
    return value if isinstance(value, Deferred) or value.is_cpu else capture(value)


def resolve(value: Any) -> Any:
    """Called on the writer thread: a float, or NOT_READY while a device copy is in flight."""
    if isinstance(value, Deferred):
        return value.resolve()
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
