"""Acting on decisions: every decision becomes an event in the run's ``events.jsonl``; a decision
of an acting rule also becomes a command in ``control/commands.jsonl`` for the run's probes.

Exactly once: ids are deterministic (``<rule>@<step>``), and before writing the dispatcher
checks the ids already in the files, so an agent that restarts and re-reads records (after
SIGKILL, before its checkpoint) does not issue a command twice. The probes skip ids they
already applied.

Consistent across ranks: a command for a multi-rank run carries ``apply_at_step``, far enough
ahead (``command_lead_seconds`` at the run's step rate, at least ``command_min_lead_steps``) that
every rank reads it before it gets there; every rank applies it after that same step. The agent
acts only on runs whose ranks it all sees, or whose rank 0 it sees when the probes agree commands over
torch.distributed (a run spanning machines, probes/collective.py: rank 0 picks the step). A decision made
before every rank's files appeared (rank 1 of a starting run is often a moment behind rank 0) waits for
them up to ``RANKS_WAIT_SECONDS``; after that it is recorded with a note and not sent.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradwatch.agent.ingest import Outgoing
from gradwatch.agent.state import AgentState
from gradwatch.rules.config import RulesConfig
from gradwatch.rules.engine import Decision, RuleFailure
from gradwatch.spool.files import open_for_appending, private_dir
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.reader import read_ids
from gradwatch.spool.records import AckRecord, AckStatus, CommandRecord, StepRecord, encode_command

log = logging.getLogger("gradwatch.agent")
MAX_SKIP_EVENTS_PER_RUN = 1000  # a run that skips every step must not fill the disk with events
MAX_SKIP_NOTES_PER_RUN = 100  # nor Grafana with annotations
_UNKNOWN_RATE_LEAD_STEPS = 10
RANKS_WAIT_SECONDS = 30.0  # how long a decision waits for the run's other ranks to appear before it is dropped

_encode = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class ActionNote:
    """A corrective action a run carried out (for Grafana annotations)."""

    id: str
    run: str
    rank: int
    step: int
    t: float
    action: str
    reason: str
    rule: str | None
    detail: str


class _AppendOnce:
    """An append-only JSONL file whose lines have unique ids (ids read back once per agent process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids = read_ids(path)

    def append(self, obj: dict[str, Any]) -> bool:
        return self.append_line(obj["id"], (_encode(obj) + "\n").encode())

    def append_line(self, line_id: str, line: bytes) -> bool:
        """Append one encoded line unless its id is in the file already; True when appended."""
        if line_id in self.ids:
            return False
        private_dir(self.path.parent)
        with open_for_appending(self.path) as f:  # never a FIFO put in its place: that would block the loop
            f.write(line)
        self.ids.add(line_id)
        return True


class ActionDispatcher:
    def __init__(self, layout: SpoolLayout, state: AgentState, lead_seconds: float, min_lead_steps: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.layout = layout
        self.state = state
        self.lead_seconds = lead_seconds
        self.min_lead_steps = min_lead_steps
        self.clock = clock
        self._events: dict[str, _AppendOnce] = {}
        self._commands: dict[str, _AppendOnce] = {}
        self._skip_events: dict[str, int] = {}
        self._noted_commands: dict[str, set[str]] = {}  # run -> command ids already reported as carried out
        self._prepared: set[str] = set()
        self._looked_at: dict[str, RulesConfig] = {}  # run -> the rules config prepare_runs last looked at
        self._reported: set[tuple[str, str]] = set()
        self._waiting: list[tuple[Decision, float]] = []  # decisions waiting for their run's ranks, oldest first

    def _file(self, cache: dict[str, _AppendOnce], run: str, path: Path) -> _AppendOnce:
        if run not in cache:
            cache[run] = _AppendOnce(path)
        return cache[run]

    def prepare_runs(self) -> None:
        """Create ``control/`` for runs with acting rules: their probes then poll for commands often.
        Forget the files of runs the agent no longer follows."""
        with self.state.lock:
            runs = []
            for run, rules in self.state.rules.runs.items():
                if run in self._prepared or self._looked_at.get(run) is rules.config:
                    continue  # (each run's rules are looked at once, and again when they change)
                self._looked_at[run] = rules.config
                if any(rules.config.acting(r) for r in rules.config.rules):
                    runs.append(run)
            known = set(self.state.runs)
        self._looked_at = {run: config for run, config in self._looked_at.items() if run in known}
        for cache in (self._events, self._commands, self._skip_events, self._noted_commands):
            for run in set(cache) - known:
                del cache[run]
        self._prepared &= known
        for run in runs:
            try:
                private_dir(SpoolLayout.commands_file(self.layout.run_dir(run)).parent)
                self._prepared.add(run)
            except OSError as exc:
                self._looked_at.pop(run, None)  # tried again at the next pass
                self._error(run, exc)

    def dispatch(self, outbox: list[Outgoing]) -> list[ActionNote]:
        """Write events and commands; return the actions newly carried out (for annotations)."""
        notes: list[ActionNote] = []
        waiting, self._waiting = self._waiting, []
        now = self.clock()
        items: list[tuple[Outgoing, float]] = [*waiting, *((item, now) for item in outbox)]
        for item, since in items:
            try:
                if isinstance(item, Decision):
                    self._decision(item, since)
                elif isinstance(item, RuleFailure):
                    self._rule_failed(item)
                elif isinstance(item.record, AckRecord):
                    new = self._ack(item.run, item.rank, item.record)
                    notes += [] if item.history else new
                else:
                    new = self._skip(item.run, item.rank, item.record)
                    notes += [] if item.history else new
            except OSError as exc:
                self._error(item.run, exc)
        return notes

    @property
    def waiting(self) -> int:
        """Decisions waiting for their run's other ranks to appear."""
        return len(self._waiting)

    def _error(self, run: str, exc: OSError) -> None:
        with self.state.lock:
            self.state.counters.handler_errors += 1
        key = (run, str(exc))
        if key not in self._reported:  # once per run and problem, not once per decision
            self._reported.add(key)
            log.error("run %s: cannot write its events or commands (%s); the decision is kept in the agent's log",
                      run, exc)

    # -- the three kinds of events -------------------------------------------------------------------
    def _decision(self, d: Decision, since: float) -> None:
        run_dir = self.layout.run_dir(d.run)
        event: dict[str, Any] = {"id": d.id, "event": "decision", "t_decided": self.clock(), **d.to_json()}
        if any(w.run == d.run for w, _ in self._waiting):
            self._waiting.append((d, since))  # after the run's earlier decisions, in their order
            return
        if d.acts and d.history:
            event["sent"] = False
            event["note"] = "history: the run had ended before this agent started"
        elif d.acts:
            apply_at, problem, ranks_missing = self._apply_at(d.run)
            if ranks_missing and self.clock() - since < RANKS_WAIT_SECONDS:
                self._waiting.append((d, since))
                return
            if problem:
                event["sent"] = False
                event["note"] = problem
                with self.state.lock:  # no command, so no acknowledgement will come: the rule decides again
                    rules = self.state.rules.runs.get(d.run)
                    if rules is not None:
                        rules.acknowledged(d.id)
                log.warning("run %s: rule %s decided %s at step %d, not sent: %s", d.run, d.rule,
                            d.action["type"], d.step, problem)
            else:
                command = CommandRecord(id=d.id, t=self.clock(), rule=d.rule, reason=d.reason, trigger_step=d.step,
                                        action=d.action, apply_at_step=apply_at, optimizer=d.target,
                                        launch=self._launch(d.run))
                new = self._file(self._commands, d.run, SpoolLayout.commands_file(run_dir)).append_line(
                    command.id, encode_command(command))
                event["sent"] = True
                event["apply_at_step"] = apply_at
                if new:  # not a decision re-made after a restart
                    log.info("run %s: rule %s (%s at step %d) -> %s%s", d.run, d.rule, d.reason, d.step,
                             d.action["type"], "" if apply_at is None else f" at step {apply_at}")
        self._file(self._events, d.run, SpoolLayout.events_file(run_dir)).append(event)

    def _rule_failed(self, failure: RuleFailure) -> None:
        event = {"id": f"failed:{failure.rule}@{failure.step}", "event": "rule_failed", "rule": failure.rule,
                 "step": failure.step, "t": self.clock(), "error": failure.error,
                 "note": "the rule is disabled for this run; its other rules and its metrics go on"}
        self._file(self._events, failure.run, SpoolLayout.events_file(self.layout.run_dir(failure.run))).append(event)

    def _ack(self, run: str, rank: int, ack: AckRecord) -> list[ActionNote]:
        event = {"id": f"{ack.id}/rank-{rank}", "event": "ack", "command": ack.id, "rank": rank,
                 "status": ack.status.value, "step": ack.step, "t": ack.t, "action": ack.action, "rule": ack.rule,
                 "detail": ack.detail, "apply_at_step": ack.apply_at_step}
        if ack.status is AckStatus.REJECTED:
            log.warning("run %s rank %d refused command %s: %s", run, rank, ack.id, ack.detail)
        elif ack.status is AckStatus.NOT_TAKEN:
            log.warning("run %s rank %d: command %s (%s) did not take: %s", run, rank, ack.id, ack.action, ack.detail)
        new = self._file(self._events, run, SpoolLayout.events_file(self.layout.run_dir(run))).append(event)
        noted = self._noted_commands.setdefault(run, set())
        not_taken = ack.status is AckStatus.NOT_TAKEN
        if not new or not (ack.status.carried_out or not_taken) or ack.id in noted:
            return []
        noted.add(ack.id)  # one note per command, from the first rank that carried it out
        return [ActionNote(id=ack.id, run=run, rank=rank, step=ack.step, t=ack.t, action=ack.action,
                           reason=ack.reason or "command", rule=ack.rule or None,
                           detail=f"did not take: {ack.detail}" if not_taken else ack.detail)]

    def _skip(self, run: str, rank: int, step: StepRecord) -> list[ActionNote]:
        count = self._skip_events.get(run, 0)
        if count >= MAX_SKIP_EVENTS_PER_RUN:
            return []  # still counted in gradwatch_actions_total
        self._skip_events[run] = count + 1
        event_id = f"skip@{step.step}/rank-{rank}"
        event = {"id": event_id, "event": "skip_step", "rank": rank, "reason": step.skip, "step": step.step,
                 "t": step.t, "grad_norm": step.grad_norm}
        new = self._file(self._events, run, SpoolLayout.events_file(self.layout.run_dir(run))).append(event)
        if not new or count >= MAX_SKIP_NOTES_PER_RUN:
            return []
        return [ActionNote(id=event_id, run=run, rank=rank, step=step.step, t=step.t, action="skip_step",
                           reason=str(step.skip), rule=None, detail=f"update skipped (gradient norm {step.grad_norm})")]

    def _launch(self, run: str) -> str:
        """The launch key of the run's processes now (rank 0's): a resumed run's new processes take only
        commands decided on their own records."""
        with self.state.lock:
            rank0 = self.state.runs.get(run, {}).get(0)
            return rank0.meta.launch_key if rank0 is not None else ""

    def _apply_at(self, run: str) -> tuple[int | None, str | None, bool]:
        """(the step after which every rank applies the command, or None: at once; a problem, or None; whether
        the problem is ranks the agent does not see)."""
        with self.state.lock:
            ranks = self.state.runs.get(run, {})
            if not ranks:
                return None, "the run is gone", False
            world = max(s.meta.world_size for s in ranks.values())
            rank0 = ranks.get(0)
            if world <= 1 or (rank0 is not None and rank0.meta.command_sync == "collective"):
                return None, None, False  # one process, or rank 0's probe hands it to every rank at a step they agree
            if len(ranks) < world:
                return None, (f"this agent sees {len(ranks)} of {world} ranks after {RANKS_WAIT_SECONDS:.0f} s; to "
                              f"act on a multi-node run, put GRADWATCH_HOME on a filesystem all nodes share"), True
            paces = [s.step_duration_ema for s in ranks.values() if s.step_duration_ema]
            if not paces:
                return max(s.steps_total for s in ranks.values()) + _UNKNOWN_RATE_LEAD_STEPS, None, False
            pace = max(paces)  # ranks of a data-parallel run go at the pace of the slowest
            now = self.clock()
            # where the ranks are now (records reach the agent a little late), then far enough ahead
            current = max(s.steps_total + int(max(0.0, now - (s.last_step_time or now)) / pace)
                          for s in ranks.values())
        return current + max(self.min_lead_steps, math.ceil(self.lead_seconds / pace)), None, False
