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
        self._awaiting_lr: list[tuple[AckCapture, list[float]]] = []

    def apply_due(self, step: int) -> None:
        """Apply every command due after ``step``; raises StopTraining after acknowledging all of them."""
        raise_stop = None
        lrs_before: list[float] | None = None  # the LRs the step just used
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
                    if command.type in _LR_CHANGING and lrs_before is None:
                        lrs_before = self.actuator.learning_rates()
                    detail = self.actuator.execute(command)
            except ValueError as exc:
                status, detail = AckStatus.REJECTED, str(exc)
            if status is AckStatus.LATE:
                self._warn("late-command", "command %s arrived after its step %s (now %d); applied now, ranks may "
                           "disagree", command.id, due, step)
            ack = AckCapture(step, time.time(), command, status, detail)
            if lrs_before is not None and command.type in _LR_CHANGING and status is not AckStatus.REJECTED:
                self._awaiting_lr.append((ack, lrs_before))  # its detail needs the LR the next step uses
            else:
                self._acknowledge(ack)
        if raise_stop is not None:
            self.lr_in_effect()  # no next step: what is set now is what is in effect
            raise raise_stop

    @property
    def awaiting_lr(self) -> bool:
        return bool(self._awaiting_lr)

    def lr_in_effect(self) -> None:
        """The next step starts (the script's scheduler has stepped), or the run ends: acknowledge the LR
        changes with the learning rates in effect before them and now, per group."""
        if not self._awaiting_lr or self.actuator is None:
            return
        after = self.actuator.learning_rates()
        for ack, before in self._awaiting_lr:
            self._acknowledge(ack._replace(detail=_with_lrs(ack.command.type, ack.detail, before, after)))
        self._awaiting_lr.clear()

    def _stop(self, command: Command, step: int) -> tuple[str, StopTraining | None]:
        self.should_stop = True
        self.stop_reason = f"rule {command.rule}: {command.reason} (step {command.trigger_step})"
        raising = self.on_stop == "raise"
        log.warning("gradwatch: stopping the run after step %d: %s%s", step, self.stop_reason,
                    "; raising gradwatch.StopTraining" if raising else "")
        detail = "should_stop set" + (", StopTraining raised" if raising else "")
        return detail, StopTraining(f"gradwatch stopped the run: {self.stop_reason}") if raising else None


#: Actions after which the learning rate in effect is reported: a cut, and a rewind (it restores the
#: optimizer's state, LR included).
_LR_CHANGING = ("reduce_lr", "rewind")


def _lr_change(before: list[float], after: list[float]) -> str:
    pairs = [f"{b:.6g}->{a:.6g}" for b, a in zip(before, after, strict=False)]
    if len(pairs) == 1:
        return f"lr {pairs[0]}"
    return "lr " + ", ".join(f"group {i}: {pair}" for i, pair in enumerate(pairs))


def _with_lrs(action: str, detail: str, before: list[float], after: list[float]) -> str:
    """``reduce_lr``: the LR in effect before and after (what the step used, what the next one uses: a
    scheduler may have moved it since the cut); ``rewind``: its detail, with the LR when it changed."""
    change = _lr_change(before, after)
    if action == "reduce_lr":
        return change + ("" if after != before else " (unchanged: at min_lr, or the scheduler undid the cut)")
    return detail if after == before else f"{detail}; {change}"
