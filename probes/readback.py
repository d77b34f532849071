"""Move scalars from the training thread to the writer thread without a host-device sync.

On the training thread, ``capture()`` turns a value into something the writer thread can
finish later: a float for Python numbers and CPU tensors (reading a CPU tensor never
synchronises), or a pending copy for CUDA tensors: an asynchronous copy into pinned host
memory plus a CUDA event, which the writer thread polls with ``event.query()`` (not a sync).

A step's CUDA scalars (norm, guard flags, loss scale; a ``log()`` call's values) travel together
(:class:`Batch`): stacked into one float64 vector per device, one copy into a row of a pinned ring
reused round robin, one event.
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
    """A 0/1 tensor (GradScaler's ``found_inf``) read as ``name`` when set and None when not, without a sync.
    ``value``: the tensor until the step's :class:`Batch` captures it."""

    __slots__ = ("name", "value")

    def __init__(self, value: Any, name: str) -> None:
        self.value = value
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


_RING_ROWS = 256  # rows in flight at most before a batch takes fresh pinned memory (the writer is behind)
_RING_WIDTH = 16  # scalars per row: a batch of more takes fresh pinned memory


class _PinnedRing:
    """Pinned float64 rows reused round robin: a step's batch lands in one; the writer frees it once read."""

    def __init__(self) -> None:
        self._rows: torch.Tensor | None = None
        self._busy = [False] * _RING_ROWS
        self._next = 0

    def take(self, n: int) -> tuple[torch.Tensor, int | None]:
        """A pinned float64 buffer of ``n`` and its row (None: not from the ring)."""
        row = self._next
        if n > _RING_WIDTH or self._busy[row]:
            return pinned((n,), torch.float64), None
        if self._rows is None:
            self._rows = pinned((_RING_ROWS, _RING_WIDTH), torch.float64)
        self._busy[row] = True
        self._next = (row + 1) % _RING_ROWS
        return self._rows[row, :n], row

    def release(self, row: int) -> None:
        self._busy[row] = False


_ring = _PinnedRing()


class _Landing:
    """One batch's copy: the pinned buffer, its event, and the values once read."""

    __slots__ = ("event", "host", "row", "values")

    def __init__(self, host: torch.Tensor, event: Any, row: int | None) -> None:
        self.host: torch.Tensor | None = host
        self.event = event
        self.row = row
        self.values: list[float] | None = None

    def read(self) -> Any:
        if self.values is not None:
            return self.values
        if graph_capture.active() or not self.event.query():
            return NOT_READY  # (an event query during a global-mode capture would invalidate it)
        assert self.host is not None
        self.values = self.host.tolist()
        self.host = None
        if self.row is not None:
            _ring.release(self.row)
        return self.values


class BatchedValue(Deferred):
    """One scalar of a :class:`Batch`; None if its batch was never sent (an error of ours, reported there)."""

    __slots__ = ("index", "landing")

    def __init__(self) -> None:
        self.landing: _Landing | None = None
        self.index = 0

    def resolve(self) -> Any:
        landing = self.landing
        if landing is None:
            return None
        values = landing.read()
        return values if values is NOT_READY else values[self.index]


class Batch:
    """CUDA scalars captured together (one step's, one ``log()`` call's): one vector per device, one copy, one
    event, instead of a pinned scalar, a copy and an event each. ``send()`` once all are added."""

    __slots__ = ("_tensors", "_values")

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._values: list[BatchedValue] = []

    def capture(self, value: Any) -> Any:
        """Like :func:`capture`; a CUDA tensor joins the batch."""
        if isinstance(value, torch.Tensor) and value.is_cuda:
            if value.numel() != 1:
                raise NotAScalar(f"expected a scalar, got a tensor of shape {tuple(value.shape)}")
            return self.add_device(value)
        return capture(value)

    def add_device(self, value: torch.Tensor) -> BatchedValue:
        handle = BatchedValue()
        self._tensors.append(value.detach().reshape(()))
        self._values.append(handle)
        return handle

    def send(self) -> None:
        tensors, self._tensors = self._tensors, []
        values, self._values = self._values, []
        by_device: dict[torch.device, list[int]] = {}
        for i, tensor in enumerate(tensors):
            by_device.setdefault(tensor.device, []).append(i)
        for indices in by_device.values():
            vector = torch.stack([tensors[i].to(torch.float64) for i in indices])
            host, row = _ring.take(len(indices))
            host.copy_(vector, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(vector.device))
            landing = _Landing(host, event, row)
            for position, i in enumerate(indices):
                values[i].landing, values[i].index = landing, position


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
