"""Wake the ingest loop when runs or rank files appear, move or go (watchdog), or the rules file changes.

Appends are not watched: a probe writes its records file every few steps, and one inotify event per write,
through watchdog's threads and queue, cost the agent more than reading the records (45 % of a core at
10,000 writes/s). The ingest loop looks at the size of each known rank's records file instead
(``SpoolIngestor.poll``): its cost grows with the number of ranks, not with how often they write. What the
kernel sends is then bounded by how often runs and files are created, whatever the write rate.

A watchdog handler that raises kills its observer thread silently, so the handler only
records which run changed and never raises; the daemon checks the observer is alive and
restarts it, and a periodic rescan catches whatever events were lost (inotify overflow).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from gradwatch.spool.files import private_dir
from gradwatch.spool.format import parse_rank_file

log = logging.getLogger("gradwatch.agent")


#: Events that mean a file was written, created, replaced or removed. Not "opened" or "closed_no_write": the
#: agent's own reads produce those, and reacting to them would read again, forever (a core at 100 %).
_WRITE_EVENTS = frozenset({"modified", "created", "moved", "deleted", "closed"})  # "closed": after writing
#: What the spool watch asks the kernel for (the inotify mask): files and directories made, moved in or out,
#: removed, and files closed after writing (a file written in one go). Not appends to a file kept open.
_SPOOL_EVENTS: list[type[FileSystemEvent]] = [FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent,
                                              FileDeletedEvent, DirDeletedEvent, FileClosedEvent]


class _RunChangeHandler(FileSystemEventHandler):
    def __init__(self, watcher: SpoolWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _WRITE_EVENTS:
            return
        try:
            self._watcher.note(event.src_path)
            if getattr(event, "dest_path", ""):
                self._watcher.note(event.dest_path)
        except Exception:  # never let an exception reach watchdog's thread
            self._watcher.errors += 1


class SpoolWatcher:
    """Collects the run directories that changed and wakes whoever waits on ``wake``."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self.wake = threading.Event()
        self.errors = 0
        self.restarts = 0
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        private_dir(self.runs_dir)
        observer = Observer()
        observer.schedule(_RunChangeHandler(self), str(self.runs_dir), recursive=True, event_filter=_SPOOL_EVENTS)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def ensure_alive(self) -> bool:
        """Restart a dead observer; True when a restart happened."""
        if self.alive():
            return False
        log.warning("file watcher was not running; restarting it (a rescan covers the gap)")
        self.stop()
        self.start()
        self.restarts += 1
        return True

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            try:
                observer.stop()
                observer.join(timeout=5)
            except Exception as exc:
                log.debug("stopping the file watcher: %r", exc)

    def note(self, path: str | bytes) -> None:
        path_str = path.decode() if isinstance(path, bytes) else path
        try:
            relative = Path(path_str).relative_to(self.runs_dir)
        except ValueError:
            return
        # the run's rank files (or the run directory itself); not what the agent writes there (events, commands)
        if relative.parts and (len(relative.parts) == 1 or
                               (len(relative.parts) == 2 and parse_rank_file(relative.parts[1]) is not None)):
            with self._lock:
                self._dirty.add(relative.parts[0])
            self.wake.set()

    def take_dirty(self) -> set[str]:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        return dirty


class RulesFileWatcher:
    """Notes when the rules file is written, replaced or moved into place (watchdog), and wakes the
    agent's loop. Its modification time is compared too, in case an event is lost."""

    def __init__(self, path: Path, wake: threading.Event | None = None) -> None:
        self.path = path.resolve()
        self.changed = threading.Event()
        self.wake = wake
        self._observer: BaseObserver | None = None
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat()
            return st.st_mtime, st.st_size
        except OSError:
            return None

    def take_change(self) -> bool:
        stamp = self._file_stamp()
        changed = self.changed.is_set() or stamp != self._stamp
        self.changed.clear()
        self._stamp = stamp
        return changed and stamp is not None

    def start(self) -> None:
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in _WRITE_EVENTS:
                    return  # reading the file (opened, closed_no_write) is not a change: it would loop
                try:
                    paths = {event.src_path, getattr(event, "dest_path", "")}
                    if any(p and Path(str(p)).resolve() == watcher.path for p in paths):
                        watcher.changed.set()
                        if watcher.wake is not None:
                            watcher.wake.set()
                except Exception:  # never let an exception reach watchdog's thread
                    watcher.changed.set()

        observer = Observer()
        observer.schedule(Handler(), str(self.path.parent), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
