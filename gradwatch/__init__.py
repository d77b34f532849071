"""gradwatch: watch PyTorch training runs, export them to Prometheus, act on divergence.

``import gradwatch`` is cheap and imports neither torch nor the agent's libraries;
``gradwatch.attach`` loads the probe (and torch, which the training script has anyway).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Probe", "RulesConfig", "StopTraining", "__version__", "attach"]

if TYPE_CHECKING:
    from gradwatch.errors import StopTraining
    from gradwatch.probes import Probe, attach
    from gradwatch.rules import RulesConfig


def __getattr__(name: str) -> Any:
    if name in ("attach", "Probe"):
        from gradwatch import probes

        return getattr(probes, name)
    if name == "StopTraining":
        from gradwatch.errors import StopTraining

        return StopTraining
    if name == "RulesConfig":
        from gradwatch.rules import RulesConfig

        return RulesConfig
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
