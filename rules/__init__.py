"""Rules: what to watch for in a run and what to do about it (configuration, detectors, decisions).

No torch here: the agent evaluates rules without it. The probe's in-process guards
(``gradwatch.probes.guards``) read their settings from the same configuration.
"""

from gradwatch.rules.config import RulesConfig, default_rules, load_rules, rules_from

__all__ = ["RulesConfig", "default_rules", "load_rules", "rules_from"]
