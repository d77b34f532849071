"""CUDA graph captures in progress in this process, so that the probe stays out of them.

While a stream captures, its kernels are recorded, not run: a hook measuring there would put the probe's copies
into the graph, and in the default ``global`` capture mode any thread's ``cudaEventQuery`` (the writer thread's
poll of a pending value) invalidates the capture. ``torch.cuda.CUDAGraph.capture_begin``/``capture_end`` are
wrapped (once, process-wide, when a probe attaches with CUDA parameters) to count the captures; the training
thread's hooks do nothing on a capturing stream, and the writer thread queries no event while any capture runs.
A replayed graph runs no Python: its steps reach no hook and are not recorded (docs/attaching.md).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

_lock = threading.Lock()
_active = 0  # captures begun and not ended, any thread
_installed = False


def active() -> bool:
    """Whether any capture is in progress in the process (a plain read: the writer thread's check per value)."""
    return _active > 0


def here() -> bool:
    """Whether the current thread's current stream is capturing (the training thread's check; cheap when none is)."""
    if not _active:
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except RuntimeError:  # no CUDA in this build
        return False


def _began() -> None:
    global _active  # noqa: PLW0603 - one count per process: captures are process-wide
    with _lock:
        _active += 1


def _ended() -> None:
    global _active  # noqa: PLW0603 - one count per process: captures are process-wide
    with _lock:
        _active = max(0, _active - 1)


def install() -> None:
    """Wrap ``CUDAGraph.capture_begin``/``capture_end`` (idempotent; ``torch.cuda.graph`` and torch.compile's CUDA
    graph trees both go through them)."""
    global _installed  # noqa: PLW0603 - once per process
    with _lock:
        if _installed:
            return
        _installed = True
    graph = torch.cuda.CUDAGraph
    graph.capture_begin = _counting(graph.capture_begin, before=_began)  # type: ignore[method-assign]
    graph.capture_end = _counting(graph.capture_end, after=_ended)  # type: ignore[method-assign]


def _counting(method: Callable[..., Any], *, before: Callable[[], None] | None = None,
              after: Callable[[], None] | None = None) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before()
            try:
                return method(*args, **kwargs)
            except BaseException:
                _ended()  # a capture that did not begin
                raise
        try:
            return method(*args, **kwargs)
        finally:
            if after is not None:
                after()

    return wrapper
