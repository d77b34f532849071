"""Carrying out the agent's commands in the training process, between two steps (training thread).

A command is applied after its ``apply_at_step`` (every rank the same step), or after the next step
when it has none; each is acknowledged once. A stop sets the probe's flag, and raises
:class:`gradwatch.StopTraining` when the probe was attached with ``on_stop="raise"``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from gradwatch.errors import StopTraining
from gradwatch.probes.acting import Actuator
from gradwatch.probes.captures import AckCapture, Capture
from gradwatch.probes.control import Command
from gradwatch.probes.warn_once import WarnOnce
from gradwatch.spool.records import AckStatus

log = logging.getLogger("gradwatch")


class CommandApplier:
    def __init__(self, inbox: deque[Command], actuator: Actuator | None, on_stop: str, warn: WarnOnce,
                 acknowledge: Callable[[Capture], None]) -> None:
        self.inbox = inbox  # filled by the writer thread
        self.actuator = actuator
        self.on_stop = on_stop
        self._warn = warn
        self._acknowledge = acknowledge
        self.should_stop = False
        self.stop_reason: str | None = None

    def apply_due(self, step: int) -> None:
        """Apply every command due after ``step``; raises StopTraining after acknowledging all of them."""
        raise_stop = None
        for command in list(self.inbox):
            due = command.apply_at_step
            if due is not None and due > step:
                continue  # other ranks are not there yet either
            self.inbox.remove(command)
            status = AckStatus.LATE if due is not None and step > due else AckStatus.APPLIED
            try:
                if command.type == "stop":
                    detail, raise_stop = self._stop(command, step)
                elif self.actuator is None:
                    raise ValueError("the probe has no optimizer to act on; pass it to gradwatch.attach()")
                else:
                    detail = self.actuator.execute(command)
            except ValueError as exc:
                status, detail = AckStatus.REJECTED, str(exc)
            if status is AckStatus.LATE:
                self._warn("late-command", "command %s arrived after its step %s (now %d); applied now, ranks may "
                           "disagree", command.id, due, step)
            self._acknowledge(AckCapture(step, time.time(), command, status, detail))
        if raise_stop is not None:
            raise raise_stop

    def _stop(self, command: Command, step: int) -> tuple[str, StopTraining | None]:
        self.should_stop = True
        self.stop_reason = f"rule {command.rule}: {command.reason} (step {command.trigger_step})"
        raising = self.on_stop == "raise"
        log.warning("gradwatch: stopping the run after step %d: %s%s", step, self.stop_reason,
                    "; raising gradwatch.StopTraining" if raising else "")
        detail = "should_stop set" + (", StopTraining raised" if raising else "")
        return detail, StopTraining(f"gradwatch stopped the run: {self.stop_reason}") if raising else None
