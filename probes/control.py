"""Commands from the agent to the probe: read on the writer thread, applied on the training thread.

The agent appends commands to ``runs/<run>/control/commands.jsonl``; every rank reads the
same file. The writer thread polls it (a ``stat`` per tick) and hands complete, valid lines
to the training thread through a deque. The training thread applies a command after the
optimizer step ``apply_at_step`` (or the next step when it has none) and acknowledges it
with an ``ack`` record. Ids already acknowledged by this rank (a probe restarted in the
same run directory) are skipped: each command is applied once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradwatch.spool.files import open_for_reading
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.reader import ACK_MARKER, read_ids
from gradwatch.spool.records import decode_command

if TYPE_CHECKING:
    from pydantic import TypeAdapter

    from gradwatch.rules.config import Action

log = logging.getLogger("gradwatch")


@dataclass(frozen=True)
class Command:
    id: str
    action: Action  # validated with the rules file's own models: their defaults apply
    apply_at_step: int | None
    trigger_step: int
    rule: str
    reason: str
    optimizer: str = ""  # the optimizer an LR cut is for ("0", "1"...); "": all of them
    launch: str = ""  # the launch key of the processes it is for ("": any)

    @property
    def type(self) -> str:
        return self.action.type


@functools.cache
def _action_model() -> TypeAdapter[Action]:
    """The rules' action models, built at the first command (pydantic stays off the probe's import)."""
    from pydantic import TypeAdapter

    from gradwatch.rules.config import Action

    return TypeAdapter(Action)


def parse_command(obj: Any) -> Command:
    """A command line's object as a Command whose action the rules' models validated; ValueError if not."""
    from pydantic import ValidationError

    record = decode_command(obj)  # RecordError is a ValueError
    try:
        action = _action_model().validate_python(record.action)
    except ValidationError as exc:
        raise ValueError(f"invalid action {record.action!r}: {exc.errors()[0]['msg']}") from None
    return Command(id=record.id, action=action, apply_at_step=record.apply_at_step, trigger_step=record.trigger_step,
                   rule=record.rule, reason=record.reason, optimizer=record.optimizer, launch=record.launch)


def acked_ids(records_file: Path) -> set[str]:
    """Command ids this rank already acknowledged (only non-empty when a probe restarts in a run)."""
    return read_ids(records_file, only_lines_with=ACK_MARKER)


class CommandReader:
    """Tails the run's command file (writer thread only)."""

    def __init__(self, run_dir: Path, already_applied: set[str], launch_key: str = "") -> None:
        self.path = SpoolLayout.commands_file(run_dir)
        self.offset = 0
        self.seen = set(already_applied)
        self.launch_key = launch_key  # commands for other processes of the run (before a resume) are not ours
        self.trusted_uids = _trusted_uids(run_dir.parent.parent)
        self._refused: str | None = None  # why the file's commands are not taken (reported once per reason)

    def poll(self) -> list[Command]:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return []
        if size <= self.offset:
            return []
        with open_for_reading(self.path) as f:  # never a FIFO: the writer thread must not block
            refused = _untrusted(os.fstat(f.fileno()), self.trusted_uids)
            if refused is not None:
                if refused != self._refused:
                    self._refused = refused
                    log.warning("gradwatch: ignoring the commands in %s: %s. Commands are taken only from a file "
                                "owned by this user (or the spool's owner) that nobody else can write "
                                "(docs/security.md)", self.path, refused)
                return []
            self._refused = None
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        commands = []
        for line in chunk[:end].split(b"\n"):
            if not line.strip():
                continue
            try:
                command = parse_command(json.loads(line))
            except ValueError as exc:  # each line is read once: reported once
                log.warning("gradwatch: ignored an invalid command in %s (%s)", self.path, exc)
                continue
            if command.id not in self.seen:
                self.seen.add(command.id)
                if not command.launch or not self.launch_key or command.launch == self.launch_key:
                    commands.append(command)
        return commands


def _trusted_uids(home: Path) -> frozenset[int]:
    """Who may command this process: its own user, and the spool's owner (an agent running as its own user
    that created GRADWATCH_HOME)."""
    uids = {os.getuid()} if hasattr(os, "getuid") else set()
    with contextlib.suppress(OSError):  # no home: only this user
        uids.add(home.stat().st_uid)
    return frozenset(uids)


def _untrusted(st: os.stat_result, trusted: frozenset[int]) -> str | None:
    """Why a commands file with this status must not be obeyed, or None."""
    if not hasattr(os, "getuid"):
        return None  # no POSIX owners (Windows): the directory's ACL is what protects it
    if st.st_uid not in trusted:
        return f"it is owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} (mode {st.st_mode & 0o777:o})"
    return None
