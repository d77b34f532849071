"""Where a hung process is: on a signal, every thread's Python stack written into the run's spool.

``faulthandler`` (the standard library) installs the handler at the C level, so the dump is written even while
the training thread is stuck inside a C call (a collective, a CUDA sync, a data loader's queue) and holds the
GIL or not: no ptrace, no py-spy, no dependency. The signal is a real-time one (``SIGRTMIN + 6``), which
nothing else in the training stacks we know uses (Lightning's SLURM requeue uses SIGUSR1, torchelastic SIGTERM);
the agent and ``gradwatch stacks`` send it only to a process whose metadata names it and whose start time
matches. One registration per process (a signal has one handler): the first probe's run gets the dumps.
Opt-in for now: ``GRADWATCH_STACK_DUMPS=1`` turns it on (the default becomes on once the agent collects stacks
on a stall by itself, issue 22).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
from pathlib import Path
from typing import IO

STACK_SIGNAL = signal.SIGRTMIN + 6 if hasattr(signal, "SIGRTMIN") else 0

class _Registration:
    """The process's one registration: the dump file is kept open for the process's life (the handler writes to
    its descriptor, whenever the signal comes)."""

    lock = threading.Lock()
    file: IO[str] | None = None


def enabled() -> bool:
    return STACK_SIGNAL != 0 and os.environ.get("GRADWATCH_STACK_DUMPS", "0").strip().lower() in (
        "1", "true", "yes", "on")


def register(path: Path) -> int:
    """Make ``STACK_SIGNAL`` append every thread's stack to ``path``; the signal number, or 0 when off, not
    possible here, or registered for another run of this process already (0: the metadata then names none)."""
    if not enabled():
        return 0
    with _Registration.lock:
        if _Registration.file is not None:
            return 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            dump = os.fdopen(fd, "a", encoding="utf-8")
            faulthandler.register(STACK_SIGNAL, file=dump, all_threads=True, chain=False)
        except (OSError, RuntimeError, ValueError):
            return 0
        _Registration.file = dump
        return int(STACK_SIGNAL)


def main_thread_ident() -> int:
    ident = threading.main_thread().ident
    return ident if ident is not None else 0
