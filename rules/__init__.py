"""Rules: what to watch for in a run and what to do about it (configuration, detectors, decisions).

No torch here: the agent evaluates rules without it. The probe's in-process guards
(``gradwatch.probes.guards``) read their settings from the same configuration. The configuration's
pydantic models load on first use, so importing the probe stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradwatch.rules.config import RulesConfig, default_rules, load_rules, rules_from

__all__ = ["RulesConfig", "default_rules", "load_rules", "rules_from"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gradwatch.rules import config

        return getattr(config, name)
    raise AttributeError(f"module 'gradwatch.rules' has no attribute {name!r}")
