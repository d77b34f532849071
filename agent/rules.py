"""Which rules each run follows, their per-run state, and reloading the agent's rules file.

A run follows the rules given to its probe (``attach(rules=...)`` or ``$GRADWATCH_RULES_FILE``
in the training process; they travel in the run's metadata) or else the agent's rules file,
which the agent reloads when it changes: a valid new version replaces the rules (rules that did
not change keep their state), an invalid one is rejected with a clear error and the previous
rules stay in force.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

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
            rules = RunRules(run, config, source)
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
        text = _read_text(self.path)
        if text is None or text == self._last_text:
            return False  # gone (an editor replacing it), or one save seen as several file events
        self._last_text = text
        try:
            config = parse_rules(text, source=str(self.path))
        except ConfigError as exc:
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.runs.clear()
        self._saved = dict(state)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


_WRITE_EVENTS = {"modified", "created", "moved", "closed"}  # "closed": closed after writing


class RulesFileWatcher:
    """Notes when the rules file is written, replaced or moved into place (watchdog), and wakes the
    agent's loop. Its modification time is compared too, in case an event is lost."""

    def __init__(self, path: Path, wake: threading.Event | None = None) -> None:
        self.path = path.resolve()
        self.changed = threading.Event()
        self.wake = wake
        self._observer: Any = None
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat()
            return st.st_mtime, st.st_size
        except OSError:
            return None

    def take_change(self) -> bool:
        stamp = self._file_stamp()
        changed = self.changed.is_set() or stamp != self._stamp
        self.changed.clear()
        self._stamp = stamp
        return changed and stamp is not None

    def start(self) -> None:
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in _WRITE_EVENTS:
                    return  # reading the file (opened, closed_no_write) is not a change: it would loop
                try:
                    paths = {event.src_path, getattr(event, "dest_path", "")}
                    if any(p and Path(str(p)).resolve() == watcher.path for p in paths):
                        watcher.changed.set()
                        if watcher.wake is not None:
                            watcher.wake.set()
                except Exception:  # never let an exception reach watchdog's thread
                    watcher.changed.set()

        observer = Observer()
        observer.schedule(Handler(), str(self.path.parent), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
