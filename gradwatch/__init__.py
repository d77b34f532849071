"""gradwatch: watch PyTorch training runs, export them to Prometheus, act on divergence.

``import gradwatch`` is cheap and imports neither torch nor the agent's libraries;
``gradwatch.attach`` loads the probe (and torch, which the training script has anyway).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Probe", "RulesConfig", "StopTraining", "__version__", "attach", "log", "read_run"]

if TYPE_CHECKING:
    from gradwatch.errors import StopTraining
    from gradwatch.history import read_run
    from gradwatch.probes import Probe, attach
    from gradwatch.rules import RulesConfig


def log(**scalars: Any) -> None:
    """Record named scalars for the current step of this process's run: ``gradwatch.log(val_loss=v)``.

    The same as ``probe.log(...)`` on the probe this process attached last, however it was attached
    (``attach``, a framework callback, ``gradwatch run``); does nothing when none is open, so one line
    serves a script that runs with or without gradwatch. Under ``gradwatch run`` the probe starts at
    the first optimizer step: scalars logged before it are not recorded.
    """
    runtime = sys.modules.get("gradwatch.probes.runtime")  # never loaded: no probe was ever opened here
    if runtime is None:
        return
    probe = runtime.process_runtime().current()
    if probe is not None:
        probe.log(**scalars)


def __getattr__(name: str) -> Any:
    if name in ("attach", "Probe"):
        from gradwatch import probes

        return getattr(probes, name)
    if name == "StopTraining":
        from gradwatch.errors import StopTraining

        return StopTraining
    if name == "read_run":  # the spool's history: no torch, no agent
        from gradwatch.history import read_run

        return read_run
    if name == "RulesConfig":
        from gradwatch.rules import RulesConfig

        return RulesConfig
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
