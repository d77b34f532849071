"""Resuming a run: the probe's state that goes into the user's checkpoint, and where a resumed process
continues the run.

``probe.state_dict()`` is plain JSON (Transformers keeps callback state in ``trainer_state.json``): the
run, the step, the id of the ``checkpoint`` record the agent keys its rules' state by, and what the
probe itself decides with (LR cuts, the clip guards' statistics and thresholds, a scaled clip
threshold, the other optimizers' step counts). A process given it back (``load_state_dict``,
``attach(resume=...)``, the framework callbacks) writes into the same run directory, starting with a
``resume`` record, and numbers its steps on from the saved one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STATE_FORMAT = 1  # the "gradwatch" key of a saved state


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed process continues: the run, the step it continues after, and the state it had then."""

    run: str
    step: int
    checkpoint: str = ""  # the id of the checkpoint record saved with the state; "": a step given alone
    state: dict[str, Any] = field(default_factory=dict)  # the probe's own state (probe.state_dict())


def resume_point(resume: Mapping[str, Any] | int, run: str | None, where: str = "resume") -> ResumePoint:
    """The point ``resume`` names: a state from ``probe.state_dict()``, or a step (of the run ``run``, else
    ``$GRADWATCH_RUN``). A value that is neither raises ValueError saying what is expected."""
    if isinstance(resume, Mapping):
        if resume.get("gradwatch") != STATE_FORMAT or not isinstance(resume.get("run"), str) \
                or not _is_step(resume.get("step")):
            raise ValueError(f"gradwatch: {where} expects the dict probe.state_dict() returned (with keys gradwatch="
                             f"{STATE_FORMAT}, run, step), got one with keys {sorted(map(str, resume))[:10]}")
        return ResumePoint(run=resume["run"], step=resume["step"], checkpoint=str(resume.get("checkpoint") or ""),
                           state=dict(resume))
    if _is_step(resume):
        name = run or os.environ.get("GRADWATCH_RUN")
        if not name:
            raise ValueError(f"gradwatch: {where}={resume} continues a run by its name: pass run='...' too (or "
                             "set GRADWATCH_RUN), or give the dict probe.state_dict() returned")
        return ResumePoint(run=name, step=int(resume))
    raise TypeError(f"gradwatch: {where} must be the dict probe.state_dict() returned or a step (int >= 0), "
                    f"got {type(resume).__name__}")


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
