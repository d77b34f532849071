"""Process liveness, shared by the probe (which records its start) and the agent (which checks it)."""

from __future__ import annotations

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
