"""Running a user script the two ways people attach gradwatch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_user_script(script: Path, args: list[str], mode: str, home: Path, run: str,
                    timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT ARGS`` under ``gradwatch run`` (mode "gradwatch-run"), with ``--attach`` (the script
    attaches its own probe), or as it is ("own-callback": a framework callback in it), into run ``run`` of the
    spool ``home``; asserts it exits 0."""
    command = [sys.executable, str(script), *args]
    if mode == "attach":
        command.append("--attach")
    elif mode == "gradwatch-run":
        command = [sys.executable, "-m", "gradwatch", "run", "--home", str(home), "--run", run, "--", *command]
    env = {**os.environ, "GRADWATCH_AUTOSTART": "0", "GRADWATCH_HOME": str(home), "GRADWATCH_RUN": run}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done
