"""Process liveness, shared by the probe (which records its start) and the agent (which checks it)."""

from __future__ import annotations

import functools
import os
from pathlib import Path


def process_start_ticks(pid: int | str = "self") -> int | None:
    """Start time of a process in clock ticks since boot (Linux only), to tell a live pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool | None:
    """True or False when this machine can tell, None when it cannot (no permission to ask)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return None
    except OSError:
        return None
    if start_ticks is not None:
        current = process_start_ticks(pid)
        if current is not None and current != start_ticks:
            return False  # the pid was reused by another process
    return True


def pid_namespace(pid: int | str = "self") -> str:
    """The process's pid namespace (``pid:[4026531836]``), "" where it cannot be read (not Linux, not allowed): a
    pid means something only inside its namespace, so an agent in another (a container, a pod) must not judge it."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


@functools.cache
def own_pid_namespace() -> str:
    return pid_namespace()


def judges_pid(host: str, pid: int, namespace: str, local_host: str) -> bool:
    """Whether this process can tell if ``pid`` lives: it ran on this host and in this pid namespace. A trainer in a
    container with host networking has the host's name but pids of its own: judged from here, a live run would be
    marked crashed (or a stranger's process taken for it). No namespace recorded (a probe before format 1.7, or
    one that could not read it): the host decides, as before."""
    if host != local_host or pid <= 0:
        return False
    return not namespace or namespace == own_pid_namespace()
