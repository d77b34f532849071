"""Opening spool files that someone else may have put there: regular files only, never blocking.

A FIFO, a device or a socket in place of a metadata, records, events or commands file would block
``open()`` (a FIFO with no writer) or the first read forever, and with it the agent's loop or the
probe's writer thread. Every spool file is opened with ``O_NONBLOCK`` and checked with ``fstat``
before anything reads or writes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path
from typing import IO, Any

PRIVATE_FILE_MODE = 0o600  # metadata holds argv, records the run's numbers, commands steer it: the user's alone
PRIVATE_DIR_MODE = 0o700


class NotARegularFile(OSError):
    """The path exists but is not a regular file (a FIFO, a device, a socket, a directory)."""


def private_dir(path: Path) -> Path:
    """``path`` and any missing parent created 0700 (whatever the umask: it can only take bits away). Existing
    directories are left as they are (docs/security.md: a spool made by an older version)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile (another rank): checked below
            os.mkdir(directory, PRIVATE_DIR_MODE)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    return path


def _open_fd(path: Path | str, flags: int, mode: int = PRIVATE_FILE_MODE) -> int:
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # ENXIO: writing to a FIFO nobody reads
            raise NotARegularFile(exc.errno, f"{path} is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(0, f"{path} is not a regular file ({file_kind(st.st_mode)}); remove it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for a message: "a FIFO", "a directory"..."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a link")):
        if test(mode):
            return name
    return "not a regular file"


def open_for_reading(path: Path) -> IO[bytes]:
    """``open(path, "rb")`` of a regular file; NotARegularFile otherwise, FileNotFoundError when absent."""
    return os.fdopen(_open_fd(path, os.O_RDONLY), "rb")


def read_at(path: Path | str, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes of a regular file from ``offset`` (``pread``: no file object; the agent tails
    thousands of files many times a second)."""
    fd = _open_fd(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def open_for_appending(path: Path, mode: int = PRIVATE_FILE_MODE) -> IO[bytes]:
    """``open(path, "ab")`` of a regular file, created with ``mode`` (whatever the umask) when absent."""
    fd = _open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    return os.fdopen(fd, "ab")


def open_lock_file(path: Path) -> IO[bytes]:
    """The agent's lock file, opened read-write (created 0600) for ``flock``."""
    return os.fdopen(_open_fd(path, os.O_RDWR | os.O_CREAT), "r+b")


def read_text(path: Path, limit: int | None = None) -> str:
    """The UTF-8 text of a regular file (at most ``limit`` bytes of it; a longer file raises ValueError)."""
    with open_for_reading(path) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data.decode("utf-8")


def load_json(path: Path, limit: int | None = None) -> Any:
    """json.loads of read_text(path, limit): ValueError for bad JSON or an oversized file."""
    return json.loads(read_text(path, limit))
