"""Which rules each run follows, their per-run state, and reloading the agent's rules file (its
watcher is agent/watcher.py's RulesFileWatcher).

A run follows the rules given to its probe (``attach(rules=...)`` or ``$GRADWATCH_RULES_FILE``
in the training process; they travel in the run's metadata) or else the agent's rules file,
which the agent reloads when it changes: a valid new version replaces the rules (rules that did
not change keep their state), an invalid one is rejected with a clear error and the previous
rules stay in force.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gradwatch.errors import ConfigError
from gradwatch.rules.config import RulesConfig, default_rules, parse_rules, read_rules_text, rules_from
from gradwatch.rules.engine import RunRules
from gradwatch.spool.records import RunMeta

log = logging.getLogger("gradwatch.agent")


class AgentRules:
    def __init__(self, config: RulesConfig, path: Path | None, text: str | None = None) -> None:
        self.config = config
        self.path = path
        self.runs: dict[str, RunRules] = {}
        self.reloads = {"ok": 0, "rejected": 0}
        self.last_error: str | None = None
        self._saved: dict[str, dict[str, Any]] = {}  # checkpointed state of runs not seen yet since start
        self.run_rule_errors: dict[str, str] = {}  # run -> why the rules it was attached with were refused
        self._last_text = text  # the file's text the rules in force came from

    @classmethod
    def from_file(cls, path: Path | None) -> AgentRules:
        """The agent's rules at start: a bad file is a startup error (ConfigError)."""
        if path is None:
            return cls(default_rules(), None)
        text = read_rules_text(path)
        return cls(parse_rules(text, source=str(path)), path, text)

    def for_run(self, run: str, meta: RunMeta) -> RunRules:
        rules = self.runs.get(run)
        if rules is None:
            config, source = self.config, "agent"
            if meta.rules is not None:
                try:
                    config, source = rules_from(meta.rules), "run"
                except ConfigError as exc:
                    self.run_rule_errors[run] = str(exc)
                    log.error("run %s: its rules are invalid (%s); it follows the agent's rules", run, exc)
            # the packaged defaults watch val_loss whether or not a run logs it: only the user's rules are checked
            rules = RunRules(run, config, source, check_metrics=source == "run" or self.path is not None)
            if run in self._saved:
                rules.load_state_dict(self._saved.pop(run))
            self.runs[run] = rules
        return rules

    def forget(self, run: str) -> None:
        self.runs.pop(run, None)
        self.run_rule_errors.pop(run, None)
        self._saved.pop(run, None)

    def reload(self) -> bool:
        """Re-read the rules file; True when new rules are in force."""
        if self.path is None:
            return False
        try:
            text = read_rules_text(self.path)  # at most MAX_YAML_BYTES; parse_rules bounds its aliases
            if text == self._last_text:
                return False  # one save seen as several file events
            self._last_text = text
            config = parse_rules(text, source=str(self.path))
        except ConfigError as exc:
            if not self.path.exists():
                return False  # gone for a moment: an editor replacing it
            self.reloads["rejected"] += 1
            self.last_error = str(exc)
            log.error("%s; the previous rules stay in force", exc)
            return False
        if config == self.config:
            return False
        self.config = config
        self.last_error = None
        self.reloads["ok"] += 1
        for rules in self.runs.values():
            if rules.source == "agent":
                rules.reconfigure(config)
        log.info("rules reloaded from %s: %d rule(s)", self.path, len(config.rules))
        return True

    def state_dict(self) -> dict[str, Any]:
        return {**self._saved, **{run: rules.state_dict() for run, rules in self.runs.items()}}

    def saved_states(self) -> dict[str, dict[str, Any]]:
        """The checkpointed rules' state of runs not seen since the agent started (kept as they were loaded)."""
        return {run: saved for run, saved in self._saved.items() if run not in self.runs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.runs.clear()
        self._saved = dict(state)
