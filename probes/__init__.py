"""The in-process side: hooks that record a training loop into the run spool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Probe", "attach"]

if TYPE_CHECKING:
    from gradwatch.probes.probe import Probe, attach


def __getattr__(name: str) -> Any:
    # lazy, so that the zero-code bootstrap can import gradwatch.probes.zerocode at torch's import
    # without loading the probe's own dependencies in processes that never train
    if name in __all__:
        from gradwatch.probes import probe

        return getattr(probe, name)
    raise AttributeError(f"module 'gradwatch.probes' has no attribute {name!r}")
