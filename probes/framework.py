"""What the Lightning and Transformers callbacks share: the ``attach()`` options they take, and how they resume."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradwatch.probes.probe import Probe
    from gradwatch.rules.config import RulesConfig


class ProbeOptions:
    """Mixin of the framework callbacks: keeps the :func:`gradwatch.attach` options for the probe
    the callback creates when training starts (the optimizers, rank and world size are known then)."""

    def __init__(self, *, run: str | None = None, labels: dict[str, str] | None = None,
                 rules: RulesConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
                 home: str | os.PathLike[str] | None = None, layer_stats_every: int | None = None,
                 autostart_agent: bool | None = None) -> None:
        self.options: dict[str, Any] = {"run": run, "labels": labels, "rules": rules, "home": home,
                                        "layer_stats_every": layer_stats_every, "autostart_agent": autostart_agent}
        self.probe: Probe | None = None
        self._reset()

    def _reset(self) -> None:
        """The callback's own per-run state."""


def resuming(saved: dict[str, Any] | None, global_step: int, run: str | None) -> dict[str, Any]:
    """The Probe arguments that continue a framework's resumed training: the probe's state from its checkpoint,
    else the framework's global step (of the run named ``run``, else of a new run numbered from there)."""
    if saved:
        return {"resume": saved}
    if global_step > 0:
        return {"resume": global_step} if run else {"first_step": global_step}
    return {}
