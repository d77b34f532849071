"""The probe's settings: ``attach()``'s arguments and their environment twins, validated once, at attach.

A wrong argument raises with a message naming it and a valid example; a wrong environment variable
(which the script did not set in code) is logged and its default used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.errors import ConfigError
from gradwatch.probes.autostart import autostart_enabled
from gradwatch.probes.identity import ProcessIdentity, default_run_name, detect_identity
from gradwatch.probes.layerstats import DEFAULT_EVERY as DEFAULT_LAYER_STATS_EVERY
from gradwatch.probes.optimizers import unwrap
from gradwatch.spool.format import SpoolLayout, default_home

if TYPE_CHECKING:  # pydantic's models load in resolve(), not when the probe is imported
    from gradwatch.rules.config import RulesConfig

log = logging.getLogger("gradwatch")

DEFAULT_MAX_QUEUE = 10_000
DEFAULT_FLUSH_INTERVAL = 0.05
ON_STOP_CHOICES = ("flag", "raise")
RULES_ENV = "GRADWATCH_RULES_FILE"
LAYER_STATS_ENV = "GRADWATCH_LAYER_STATS_EVERY"
ON_STOP_ENV = "GRADWATCH_ON_STOP"

OptimizerArg = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


@dataclass(frozen=True)
class ProbeSettings:
    optimizers: list[torch.optim.Optimizer]
    identity: ProcessIdentity
    layout: SpoolLayout
    requested_run: str
    labels: dict[str, str]
    max_queue: int
    flush_interval: float
    autostart_agent: bool
    rules: RulesConfig
    explicit_rules: bool  # given to attach() or by $GRADWATCH_RULES_FILE: they travel with the run's metadata
    on_stop: str
    layer_stats_every: int  # 0: off
    measure_in_step_hook: bool

    @classmethod
    def resolve(cls, model: Any, optimizer: OptimizerArg, *, run: str | None, labels: dict[str, str] | None,
                home: str | os.PathLike[str] | None, rank: int | None, world_size: int | None, max_queue: int,
                flush_interval: float, autostart_agent: bool | None, rules: Any, on_stop: str | None,
                layer_stats_every: int | None, measure_in_step_hook: bool,
                launch_id: str | None) -> ProbeSettings:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"gradwatch.attach: model must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = _optimizer_list(optimizer)
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise ValueError(f"gradwatch.attach: max_queue must be a positive integer, got {max_queue!r}")
        if not flush_interval > 0:
            raise ValueError(f"gradwatch.attach: flush_interval must be > 0 seconds, got {flush_interval!r}")
        if labels is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise TypeError("gradwatch.attach: labels must map str to str, e.g. labels={'team': 'vision'}")
        on_stop = on_stop or os.environ.get(ON_STOP_ENV) or "flag"
        if on_stop not in ON_STOP_CHOICES:
            raise ValueError(f"gradwatch.attach: on_stop must be one of {ON_STOP_CHOICES}, got {on_stop!r}")
        every = _layer_stats_every(layer_stats_every)
        resolved_rules, explicit = _resolve_rules(rules)
        identity = detect_identity(rank, world_size, launch_id)
        return cls(
            optimizers=optimizers, identity=identity,
            layout=SpoolLayout(Path(home).expanduser() if home is not None else default_home()),
            requested_run=run if run is not None else default_run_name(identity), labels=dict(labels or {}),
            max_queue=max_queue, flush_interval=flush_interval,
            autostart_agent=autostart_enabled() if autostart_agent is None else autostart_agent,
            rules=resolved_rules, explicit_rules=explicit, on_stop=on_stop,
            layer_stats_every=every if optimizers else 0,  # with a model: now or adopted later
            measure_in_step_hook=measure_in_step_hook)

    def run_metadata(self) -> dict[str, Any]:
        """What the run's metadata says about these settings (spool.records.RunMeta fields)."""
        return {"rules": self.rules.model_dump(mode="json") if self.explicit_rules else None,
                "guards": self.rules.guards.model_dump(mode="json"), "dry_run": self.rules.dry_run,
                "on_stop": self.on_stop}


def _resolve_rules(rules: Any) -> tuple[RulesConfig, bool]:
    """(the rules, whether they were given explicitly). A bad ``rules=`` argument raises ConfigError; a
    bad ``$GRADWATCH_RULES_FILE`` is logged and the defaults are used (the script did not ask in code)."""
    from gradwatch.rules.config import default_rules, rules_from

    if rules is not None:
        return rules_from(rules), True
    path = os.environ.get(RULES_ENV)
    if path:
        try:
            return rules_from(Path(path)), True
        except ConfigError as exc:
            log.error("gradwatch: %s (from %s); using the default rules", exc, RULES_ENV)
    return default_rules(), False


def _layer_stats_every(value: int | None) -> int:
    if value is None:
        env = os.environ.get(LAYER_STATS_ENV)
        if env is None:
            return DEFAULT_LAYER_STATS_EVERY
        try:
            value = int(env)
        except ValueError:
            log.error("gradwatch: %s=%r is not an integer; using %d", LAYER_STATS_ENV, env, DEFAULT_LAYER_STATS_EVERY)
            return DEFAULT_LAYER_STATS_EVERY
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"gradwatch.attach: layer_stats_every must be an integer >= 0 (0: off), got {value!r}")
    return value


def _optimizer_list(optimizer: OptimizerArg) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    items = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    found = [unwrap(item) for item in items]
    for item in found:
        if not isinstance(item, torch.optim.Optimizer):
            raise TypeError("gradwatch.attach: optimizer must be a torch.optim.Optimizer or a list of them, "
                            f"got {type(item).__name__}")
    if not found:
        raise ValueError("gradwatch.attach: optimizer is an empty list; pass at least one optimizer or None")
    return found
