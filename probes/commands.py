"""Carrying out the agent's commands in the training process, between two steps (training thread).

A command is applied after its ``apply_at_step`` (every rank the same step), or after the next step
when it has none; each is acknowledged once. A stop sets the probe's flag, and raises
:class:`gradwatch.StopTraining` when the probe was attached with ``on_stop="raise"``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable

from gradwatch.errors import StopTraining
from gradwatch.probes.acting import Actuator, NotTaken
from gradwatch.probes.captures import AckCapture, Capture
from gradwatch.probes.control import Command
from gradwatch.probes.warn_once import WarnOnce
from gradwatch.spool.records import AckStatus

log = logging.getLogger("gradwatch")


class CommandApplier:
    """Applies due commands and acknowledges each once its effect is seen: an LR change with the LR the
    next update uses, a clip-threshold change with the threshold the next clip uses, a rewind once its
    skipped updates were skipped; otherwise as ``not_taken``, with why."""

    def __init__(self, inbox: deque[Command], actuator: Actuator | None, on_stop: str, warn: WarnOnce,
                 acknowledge: Callable[[Capture], None]) -> None:
        self.inbox = inbox  # filled by the writer thread
        self.actuator = actuator
        self.on_stop = on_stop
        self._warn = warn
        self._acknowledge = acknowledge
        self.should_stop = False
        self.stop_reason: str | None = None
        self._awaiting_lr: list[_AwaitingLR] = []  # seen at the next update's start
        self._awaiting_step: list[_AwaitingStep] = []  # seen in the next steps' records
        # refused or without effect: written when the next step starts, after this step's own scalars (a rule
        # reading them must not take them for records from after the command)
        self._held: list[AckCapture] = []
        self._awaiting_stop: AckCapture | None = None  # a stop: seen taken when no step follows it

    def apply_due(self, step: int) -> None:
        """Apply every command due after ``step``; raises StopTraining after acknowledging all of them."""
        raise_stop = None
        for command in list(self.inbox):
            due = command.apply_at_step
            if due is not None and due > step:
                continue  # other ranks are not there yet either
            self.inbox.remove(command)
            status = AckStatus.LATE if due is not None and step > due else AckStatus.APPLIED
            lr_before: _AwaitingLR | None = None
            try:
                if command.type == "stop":
                    detail, raise_stop = self._stop(command, step)
                elif self.actuator is None:
                    raise ValueError("the probe has no optimizer to act on; pass it to gradwatch.attach()")
                else:
                    if command.type in _LR_CHANGING:
                        lr_before = _AwaitingLR(self.actuator)
                    detail = self.actuator.execute(command)
            except NotTaken as exc:
                status, detail, lr_before = AckStatus.NOT_TAKEN, str(exc), None
            except ValueError as exc:
                status, detail, lr_before = AckStatus.REJECTED, str(exc), None
            if status is AckStatus.LATE:
                self._warn("late-command", "command %s arrived after its step %s (now %d); applied now, ranks may "
                           "disagree", command.id, due, step)
            ack = AckCapture(step, time.time(), command, status, detail)
            if lr_before is not None:
                lr_before.ack = ack
                self._awaiting_lr.append(lr_before)  # its detail needs the LR the next update uses
            elif status.carried_out and command.type in _SEEN_IN_STEPS:
                self._supersede(command)
                self._awaiting_step.append(_AwaitingStep(ack, self.actuator, command))  # type: ignore[arg-type]
            elif command.type == "stop" and status.carried_out:
                self._awaiting_stop = ack
            elif command.type == "stop":
                self._acknowledge(ack)
            else:
                self._held.append(ack)
        if raise_stop is not None:
            self.lr_in_effect()  # no next step: what is set now is what is in effect
            raise raise_stop

    @property
    def awaiting_lr(self) -> bool:
        """Acknowledgements that wait for the next step to start."""
        return bool(self._awaiting_lr or self._held)

    @property
    def awaiting_step(self) -> bool:
        return bool(self._awaiting_step) or self._awaiting_stop is not None

    def lr_in_effect(self) -> None:
        """The next update starts (the script has set its LR, the cut is applied), or the run ends:
        acknowledge the LR changes with the learning rates in effect before them and now, per group."""
        for ack in self._held:
            self._acknowledge(ack)
        self._held.clear()
        if not self._awaiting_lr or self.actuator is None:
            return
        for waiting in self._awaiting_lr:
            ack = waiting.resolve()
            if ack.command.type == "rewind" and ack.status.carried_out and self.actuator.guards.skip_next:
                self._awaiting_step.append(_AwaitingStep(ack, self.actuator, ack.command))
            else:
                self._acknowledge(ack)
        self._awaiting_lr.clear()

    def step_recorded(self, clip_threshold: float | None, skip: str | None) -> None:
        """A step was recorded (its clip threshold, its skip reason): acknowledge what it shows."""
        stop = self._awaiting_stop
        if stop is not None:  # a step after the stop: the script went on
            self._awaiting_stop = None
            how = "caught gradwatch.StopTraining" if self.on_stop == "raise" else \
                "does not read probe.should_stop (check it after each step, or attach with on_stop='raise')"
            self._acknowledge(stop._replace(status=AckStatus.NOT_TAKEN,
                                            detail=f"{stop.detail}, but the script went on: it {how}"))
        still = []
        for waiting in self._awaiting_step:
            ack = waiting.seen(clip_threshold, skip)
            if ack is None:
                still.append(waiting)
            else:
                self._acknowledge(ack)
        self._awaiting_step = still

    def _supersede(self, command: Command) -> None:
        """Another clip-threshold change before any clip: the waiting one took, and this one builds on it."""
        for waiting in [w for w in self._awaiting_step if w.ack.command.type == command.type]:
            self._awaiting_step.remove(waiting)
            self._acknowledge(waiting.ack._replace(detail=f"{waiting.ack.detail} (then scaled again by {command.id})"))

    def run_ended(self) -> None:
        """No step comes: acknowledge what waits, with what was seen so far."""
        self.lr_in_effect()
        if self._awaiting_stop is not None:
            self._acknowledge(self._awaiting_stop._replace(detail=f"{self._awaiting_stop.detail}; the run ended"))
            self._awaiting_stop = None
        for waiting in self._awaiting_step:
            self._acknowledge(waiting.unseen())
        self._awaiting_step = []

    def _stop(self, command: Command, step: int) -> tuple[str, StopTraining | None]:
        self.should_stop = True
        self.stop_reason = f"rule {command.rule}: {command.reason} (step {command.trigger_step})"
        raising = self.on_stop == "raise"
        log.warning("gradwatch: stopping the run after step %d: %s%s", step, self.stop_reason,
                    "; raising gradwatch.StopTraining" if raising else "")
        detail = "should_stop set" + (", StopTraining raised" if raising else "")
        return detail, StopTraining(f"gradwatch stopped the run: {self.stop_reason}") if raising else None


class _AwaitingLR:
    """An LR-changing command, until the next update shows the LR it uses."""

    def __init__(self, actuator: Actuator) -> None:
        self.actuator = actuator
        self.before = actuator.learning_rates()  # what the step just done used
        groups = actuator.optimizers.param_groups
        self.old_cuts = [actuator.lr_cut.ratio_of(group) for group in groups]
        self.ack: AckCapture | None = None

    def resolve(self) -> AckCapture:
        ack = self.ack
        assert ack is not None
        after = self.actuator.learning_rates()
        detail = _with_lrs(ack.command.type, ack.detail, self.before, after)
        if ack.command.type != "reduce_lr" or not ack.status.carried_out:
            return ack._replace(detail=detail)
        cut = self.actuator.lr_cut
        without = [cut.without(group, old) for group, old in zip(self.actuator.optimizers.param_groups,
                                                                    self.old_cuts, strict=False)]
        if any(a < w * (1 - 1e-9) for a, w in zip(after, without, strict=False)):
            return ack._replace(detail=detail)
        return ack._replace(status=AckStatus.NOT_TAKEN,
                            detail=detail + ": the next update uses the LR it would have used without the cut")


class _AwaitingStep:
    """A clip-threshold change until the next step's clip, a rewind until its skipped updates."""

    def __init__(self, ack: AckCapture, actuator: Actuator, command: Command) -> None:
        self.ack = ack
        self.actuator = actuator
        self.expected_clip = actuator.expected_clip_threshold if command.type == "scale_clip" else None
        self.skips_left = actuator.guards.skip_next if command.type == "rewind" else 0
        self.skipped = 0

    def seen(self, clip_threshold: float | None, skip: str | None) -> AckCapture | None:
        ack = self.ack
        if ack.command.type == "rewind":
            if skip == "rewind":
                self.skipped += 1
            if self.skipped < self.skips_left:
                return None
            return ack._replace(detail=f"{ack.detail}; {self.skipped} updates skipped")
        expected = self.expected_clip
        if expected is None or clip_threshold is None:
            if skip is not None:
                return None  # a skipped update does not clip: the next one shows the threshold
            return ack._replace(status=AckStatus.NOT_TAKEN,
                                detail=f"{ack.detail}, but the next step was not clipped by norm")
        if math.isclose(clip_threshold, expected, rel_tol=1e-9):
            return ack._replace(detail=f"{ack.detail} (the next clip used it)")
        return ack._replace(status=AckStatus.NOT_TAKEN,
                            detail=f"{ack.detail}, but the next clip used {clip_threshold:.6g}")

    def unseen(self) -> AckCapture:
        ack = self.ack
        if ack.command.type == "rewind":
            return ack._replace(detail=f"{ack.detail}; the run ended after {self.skipped} skipped updates")
        return ack._replace(status=AckStatus.NOT_TAKEN, detail=f"{ack.detail}, but the run ended before a clip")


#: Actions after which the learning rate in effect is reported: a cut, and a rewind (it restores the
#: optimizer's state, LR included).
_LR_CHANGING = ("reduce_lr", "rewind")
#: Actions whose effect the next steps' records show.
_SEEN_IN_STEPS = ("scale_clip",)


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
        return change
    return detail if after == before else f"{detail}; {change}"
