"""gradwatch: watch PyTorch training runs, export them to Prometheus, act on divergence.

``import gradwatch`` is cheap and imports neither torch nor the agent's libraries;
``gradwatch.attach`` loads the probe (and torch, which the training script has anyway).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Probe", "attach", "__version__"]

if TYPE_CHECKING:
    from gradwatch.probes import Probe, attach


def __getattr__(name: str) -> Any:
    if name in ("attach", "Probe"):
        from gradwatch import probes

        return getattr(probes, name)
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
