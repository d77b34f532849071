"""Start an agent daemon when a probe finds none serving its spool (the embedded default).

The agent runs as its own process, never as a thread of the training process: it cannot
slow training down, and one agent serves every run and rank on the machine. Whoever starts
it first wins the agent lock; agents started by racing ranks exit at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import ModuleType

from gradwatch.spool.files import open_for_appending, open_lock_file, private_dir
from gradwatch.spool.format import SpoolLayout

fcntl: ModuleType | None
try:
    import fcntl as _fcntl

    fcntl = _fcntl
except ImportError:  # Windows: no flock; autostart is skipped
    fcntl = None

AUTOSTART_ENV = "GRADWATCH_AUTOSTART"
IDLE_EXIT_SECONDS = 600


def autostart_enabled() -> bool:
    return os.environ.get(AUTOSTART_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def agent_running(layout: SpoolLayout) -> bool:
    """Whether some process holds the agent lock of this spool."""
    if fcntl is None:
        return True
    private_dir(layout.agent_dir)
    with open_lock_file(layout.agent_lock_file) as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return False


def spawn_agent(layout: SpoolLayout) -> subprocess.Popen[bytes]:
    """Start ``gradwatch agent`` detached, logging to ``<home>/agent/agent.log``."""
    private_dir(layout.agent_dir)
    log = open_for_appending(layout.agent_log_file)  # handed to the child; closed after Popen
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "gradwatch", "agent", "--home", str(layout.home),
             "--exit-when-idle", str(IDLE_EXIT_SECONDS), "--if-not-running", "--port-fallback"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
        )
    finally:
        log.close()


def ensure_agent(layout: SpoolLayout) -> bool:
    """Spawn an agent unless one runs; True when this call started one."""
    if not autostart_enabled() or agent_running(layout):
        return False
    spawn_agent(layout)
    return True
