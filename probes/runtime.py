"""What is process-wide about probes: the probes open in this process, and closing them at exit (an
uncaught exception marks their runs failed; StopTraining, stopped). One instance per process,
handed to every probe; the zero-code launcher asks it whether a probe is open already."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util
import os
import sys
import threading
import weakref
from types import TracebackType
from typing import TYPE_CHECKING

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

    def close_all(self) -> None:
        pid = os.getpid()
        last = self._uncaught[-1] if self._uncaught else sys.exc_info()[1]  # a worker's target raising: in flight
        for probe in list(self._open):
            if probe.identity.pid != pid:
                continue  # a forked child (e.g. a DataLoader worker) does not own the parent's probes
            if isinstance(last, StopTraining):
                probe.close(status=EndStatus.STOPPED, error=str(last), timeout=5.0)
            elif last is not None:
                probe.close(status=EndStatus.FAILED, error=repr(last), timeout=5.0)
            else:
                probe.close(timeout=5.0)


_RUNTIME = ProcessRuntime()


def process_runtime() -> ProcessRuntime:
    """This process's runtime (the default every probe is given)."""
    return _RUNTIME
