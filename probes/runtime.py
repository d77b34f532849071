"""What is process-wide about probes: the probes open in this process, and closing them at exit. How the
process ends decides how the runs end: an uncaught exception marks them failed (a crash), StopTraining
stopped, Ctrl-C or SIGTERM interrupted, ``sys.exit(n)`` with n != 0 failed with that exit code. One
instance per process, handed to every probe; the zero-code launcher asks it whether a probe is open already.

The signal handlers are installed only where the process has Python's defaults (a framework's own, such as
Lightning's, are left alone), only from the main thread, and keep the default behaviour: SIGINT still
raises KeyboardInterrupt, SIGTERM still ends the process (after the probes wrote their end records).
``sys.exit`` is wrapped to see the exit status (the interpreter keeps it from atexit handlers); a
``raise SystemExit(n)`` bypasses it and ends as finished.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import weakref
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from gradwatch.errors import StopTraining
from gradwatch.spool.records import EndStatus

if TYPE_CHECKING:
    from gradwatch.probes.probe import Probe


class ProcessRuntime:
    def __init__(self) -> None:
        self._open: weakref.WeakSet[Probe] = weakref.WeakSet()
        self._uncaught: list[BaseException] = []
        self._lock = threading.Lock()
        self._exit_handlers = False
        self._exit_pid: int | None = None  # the process whose exit closes the probes (a fork child is another)
        self.interrupted_by: str | None = None  # "SIGINT" / "SIGTERM" once one arrived
        self.interrupted_at = 0.0  # when (time.monotonic()): it ends only the probes opened before it
        self.exit_code: int | None = None  # what sys.exit() was called with, as a status

    def opened(self, probe: Probe) -> None:
        self._open.add(probe)
        self._install_exit_handlers()

    def closed(self, probe: Probe) -> None:
        self._open.discard(probe)

    def current(self) -> Probe | None:
        """The probe this process opened last and has not closed (``gradwatch.log`` records into it)."""
        pid = os.getpid()
        mine = [probe for probe in list(self._open) if probe.identity.pid == pid]
        return max(mine, key=lambda probe: probe.opened_at) if mine else None

    def probe_on(self, optimizers: list[Any]) -> Probe | None:
        """An open probe of this process that already records one of ``optimizers``."""
        pid = os.getpid()
        for probe in list(self._open):
            if probe.identity.pid == pid and not probe.closed and any(probe.records(o) for o in optimizers):
                return probe
        return None

    def has_open_probe(self) -> bool:
        """Whether this process (not a forked parent's copy) has an open probe."""
        pid = os.getpid()
        return any(probe.identity.pid == pid for probe in list(self._open))

    def _install_exit_handlers(self) -> None:
        with self._lock:
            pid = os.getpid()
            if self._exit_pid != pid:
                self._exit_pid = pid
                if multiprocessing.parent_process() is not None:
                    # a multiprocessing worker leaves through os._exit: atexit does not run there, these do
                    multiprocessing.util.Finalize(None, self.close_all, exitpriority=100)
            if self._exit_handlers:
                return
            self._exit_handlers = True
            previous = sys.excepthook

            def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
                self._uncaught.append(exc)
                previous(exc_type, exc, tb)

            sys.excepthook = excepthook
            atexit.register(self.close_all)
            self._watch_exit()
            if threading.current_thread() is threading.main_thread():
                self._watch_signals()

    def _watch_exit(self) -> None:
        original = sys.exit

        @functools.wraps(original)
        def exit(status: Any = None) -> NoReturn:
            self.exit_code = exit_status(status)
            original(status)
            raise SystemExit(status)  # not reached: for type checkers

        sys.exit = exit

    def _watch_signals(self) -> None:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            def on_sigint(signum: int, frame: FrameType | None) -> None:
                self.interrupted_by, self.interrupted_at = "SIGINT", time.monotonic()
                signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without gradwatch

            signal.signal(signal.SIGINT, on_sigint)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted_by, self.interrupted_at = "SIGTERM", time.monotonic()
        if signal.getsignal(signal.SIGTERM) != self._on_sigterm:  # bound methods: equal, never identical
            return  # called by a handler installed over ours (it ends the process its own way; close_all follows)
        self.close_all(timeout=2.0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # then the default: the process ends, killed by SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)

    def close_all(self, timeout: float = 5.0) -> None:
        pid = os.getpid()
        last = self._uncaught[-1] if self._uncaught else sys.exc_info()[1]  # a worker's target raising: in flight
        for probe in list(self._open):
            if probe.identity.pid != pid:
                continue  # a forked child (e.g. a DataLoader worker) does not own the parent's probes
            status, error, exit_code = self.ending(last, probe.opened_at, at_exit=True)
            probe.close(status=status, error=error, exit_code=exit_code, timeout=timeout)

    def ending(self, exc: BaseException | None, opened_at: float = 0.0,
               at_exit: bool = False) -> tuple[EndStatus, str | None, int | None]:
        """How a run opened at ``opened_at`` (time.monotonic()) ends, given the exception its process ends with
        (None: none): (status, error, exit code). A signal before it opened (a Ctrl-C a script caught, then
        training again) is not its. ``at_exit``: the process is exiting, with the status ``sys.exit`` was given; a
        probe closed before (its ``with`` block ended) is not judged by a ``sys.exit`` the script caught earlier."""
        interrupted_by = self.interrupted_by if self.interrupted_at >= opened_at else None
        # after Ctrl-C a script (Lightning) may exit(1) or finish; after SIGTERM whatever it raises is the signal's doing
        signalled = interrupted_by == "SIGTERM" or (interrupted_by and (exc is None or isinstance(exc, SystemExit)))
        if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "SIGTERMException" or signalled:
            return EndStatus.INTERRUPTED, interrupted_by or type(exc).__name__, None
        if isinstance(exc, StopTraining):
            return EndStatus.STOPPED, str(exc), None
        if isinstance(exc, SystemExit):
            code = exit_status(exc.code)
            return (EndStatus.FINISHED, None, None) if code == 0 else \
                (EndStatus.FAILED, f"exited with status {code}", code)
        if exc is not None:
            return EndStatus.FAILED, repr(exc), None
        if at_exit and self.exit_code:
            return EndStatus.FAILED, f"exited with status {self.exit_code}", self.exit_code
        return EndStatus.FINISHED, None, None


def exit_status(code: Any) -> int:
    """The process status ``sys.exit(code)`` gives: None 0, an int itself, anything else (a message) 1."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    return 1



_RUNTIME = ProcessRuntime()


def process_runtime() -> ProcessRuntime:
    """This process's runtime (the default every probe is given)."""
    return _RUNTIME
