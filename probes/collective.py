"""Commands for a run whose ranks span machines: agreed over the training's own process group.

An agent sees only the ranks of its machine, and its rules read rank 0. So rank 0's probe alone reads
the run's commands, and every ``every`` steps all ranks take part in one broadcast from rank 0 (on
the default process group when it is gloo, else on a gloo group made for it): the commands rank 0 got
since the last round, each with the step after which every rank applies it, ``every`` steps on. The
broadcast is posted asynchronously and collected when it has completed, so a rank never waits for it
unless it is ``every`` steps ahead of rank 0 (then it applies late and says so, as with the file).
Per step this costs a modulo and, while a round is in flight, one ``is_completed()``; per round, one
broadcast of ``PAYLOAD_BYTES`` bytes on the CPU (docs/benchmarks.md).

On when the ranks span several machines (``LOCAL_WORLD_SIZE`` < ``WORLD_SIZE``, or ``SLURM_NNODES`` > 1:
the same answer on every rank), or ``GRADWATCH_COMMAND_SYNC=collective``; ``file`` turns it off.
Every rank must attach a probe (the rounds are collectives).
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from gradwatch.probes.control import Command, parse_command
from gradwatch.probes.warn_once import WarnOnce
from gradwatch.spool.records import CommandRecord, encode_command

SYNC_ENV = "GRADWATCH_COMMAND_SYNC"
EVERY_ENV = "GRADWATCH_COMMAND_SYNC_EVERY"
DEFAULT_EVERY = 10
PAYLOAD_BYTES = 16 * 1024  # a round's commands, JSON; more wait for the next round


class CommandSync:
    """One rank's side of the rounds. Training thread only, except ``incoming`` (rank 0's writer thread fills it)."""

    def __init__(self, rank: int, every: int, group: Any, warn: WarnOnce) -> None:
        self.rank = rank
        self.every = every
        self.group = group  # None: the default group
        self._warn = warn
        self.incoming: deque[Command] = deque()  # rank 0: the commands read from the run's command file
        self._rounds: deque[tuple[Any, torch.Tensor]] = deque()  # broadcasts in flight: (work, buffer)

    def at_step(self, step: int, inbox: deque[Command]) -> None:
        """After each step: take in completed rounds, and post a round every ``every`` steps."""
        rounds = self._rounds
        while rounds and rounds[0][0].is_completed():
            _, buffer = rounds.popleft()
            if self.rank != 0:
                inbox.extend(self._decode(buffer))
        if step % self.every == 0:
            self._post(step, inbox)

    def _post(self, step: int, inbox: deque[Command]) -> None:
        buffer = torch.zeros(PAYLOAD_BYTES, dtype=torch.uint8)
        if self.rank == 0 and self.incoming:
            sent = self._encode(buffer, step + self.every)
            inbox.extend(sent)  # rank 0 applies them after the same step as the others
        work = dist.broadcast(buffer, src=0, group=self.group, async_op=True)
        self._rounds.append((work, buffer))

    def _encode(self, buffer: torch.Tensor, apply_at: int) -> list[Command]:
        """Command-file lines (the spool's own encoding) of as many waiting commands as fit, to apply after
        ``apply_at``; returns those commands."""
        sent: list[Command] = []
        payload = b""
        while self.incoming:
            command = replace(self.incoming[0], apply_at_step=apply_at)
            line = encode_command(CommandRecord(
                id=command.id, action=command.action.model_dump(mode="json"), apply_at_step=apply_at,
                trigger_step=command.trigger_step, rule=command.rule, reason=command.reason,
                optimizer=command.optimizer))
            if len(payload) + len(line) > PAYLOAD_BYTES:
                if payload:
                    break  # the rest in the next round
                self.incoming.popleft()  # can never be sent: refused rather than blocking the others
                self._warn("sync-too-big", "command %s is too large to send to the other ranks; dropped", command.id)
                continue
            payload += line
            sent.append(command)
            self.incoming.popleft()
        if payload:
            buffer[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return sent

    def _decode(self, buffer: torch.Tensor) -> list[Command]:
        commands = []
        for line in buffer.numpy().tobytes().rstrip(b"\0").splitlines():
            try:
                commands.append(parse_command(json.loads(line)))
            except ValueError as exc:  # one bad line costs only itself
                self._warn("sync-decode", "a command from rank 0 could not be read (%s); ignored", exc)
        return commands


def command_sync(rank: int, world_size: int, warn: WarnOnce) -> CommandSync | None:
    """The rounds for this process, when its run spans machines (see the module's doc); else None."""
    mode = os.environ.get(SYNC_ENV, "auto").strip().lower()
    if world_size < 2 or mode == "file" or not (dist.is_available() and dist.is_initialized()):
        return None
    if mode not in ("auto", "collective"):
        warn("sync-mode", "%s=%r is not one of auto, collective, file; using auto", SYNC_ENV, mode)
        mode = "auto"
    if mode == "auto" and not spans_machines(world_size):
        return None
    every = _every(warn)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return CommandSync(rank, every, group, warn)


def spans_machines(world_size: int) -> bool:
    """Whether the launcher says the ranks run on several machines (the same answer on every rank)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    nodes = os.environ.get("SLURM_NNODES", "") or os.environ.get("SLURM_JOB_NUM_NODES", "")
    return (local.isdigit() and 0 < int(local) < world_size) or (nodes.isdigit() and int(nodes) > 1)


def _every(warn: WarnOnce) -> int:
    value = os.environ.get(EVERY_ENV, "")
    if not value:
        return DEFAULT_EVERY
    if value.isdigit() and int(value) > 0:
        return int(value)
    warn("sync-every", "%s=%r is not a positive integer; using %d", EVERY_ENV, value, DEFAULT_EVERY)
    return DEFAULT_EVERY
