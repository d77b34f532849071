"""``gradwatch run -- CMD``: run an unmodified training command with the zero-code probe.

The command runs as a child process with an environment that makes every Python process it starts
(torchrun's workers included) load gradwatch's bootstrap at start-up (gradwatch/_bootstrap, first
on PYTHONPATH), which instruments torch once the script imports it. This process only starts the
agent, forwards signals and passes the command's exit status through.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from gradwatch.errors import GradwatchError

BOOTSTRAP_DIR = Path(__file__).resolve().parent / "_bootstrap"


class CommandNotFound(GradwatchError):
    pass


def default_run_name(command: Sequence[str]) -> str:
    """``<script>-<6 hex>``: the first ``*.py`` argument, else the ``-m`` module, else the program. The hex is new
    for each launch, but the same on every machine of one multi-machine launch: from the SLURM job, else
    torchrun's ``--rdzv-id``."""
    script = next((Path(arg).stem for arg in command if arg.endswith(".py")), None)
    if script is None and "-m" in command[:-1]:
        script = command[command.index("-m") + 1].rsplit(".", 1)[-1]
    shared = _shared_launch_id(command)
    suffix = hashlib.sha1(shared.encode()).hexdigest()[:6] if shared else secrets.token_hex(3)
    return f"{script or Path(command[0]).name}-{suffix}"


def _shared_launch_id(command: Sequence[str]) -> str | None:
    if os.environ.get("SLURM_JOB_ID"):
        return ":".join(os.environ.get(k, "") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"))
    for i, arg in enumerate(command):
        for flag in ("--rdzv-id", "--rdzv_id"):
            if arg == flag and i + 1 < len(command):
                return f"rdzv:{command[i + 1]}"
            if arg.startswith(flag + "="):
                return f"rdzv:{arg.split('=', 1)[1]}"
    return None


def child_environment(run: str, rules: Path | None, home: Path | None, on_stop: str,
                      base: dict[str, str] | None = None, batch_size: str = "auto",
                      batch_dim: int | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["GRADWATCH_ZERO_CODE"] = "1"
    env["GRADWATCH_RUN"] = run  # every rank and process of the command joins one run
    env["GRADWATCH_ON_STOP"] = on_stop
    env["GRADWATCH_BATCH_SIZE"] = batch_size
    if batch_dim is not None:
        env["GRADWATCH_BATCH_DIM"] = str(batch_dim)
    if rules is not None:
        env["GRADWATCH_RULES_FILE"] = str(rules.resolve())
    if home is not None:
        env["GRADWATCH_HOME"] = str(home.resolve())
    python_path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(BOOTSTRAP_DIR) + (os.pathsep + python_path if python_path else "")
    return env


def run_command(command: Sequence[str], env: dict[str, str]) -> int:
    """Run ``command`` to its end; its exit status (128 + N when signal N killed it, as shells do)."""
    try:
        child = subprocess.Popen(list(command), env=env)
    except FileNotFoundError:
        raise CommandNotFound(f"command not found: {command[0]!r} (check the spelling and your PATH)") from None
    except PermissionError:
        raise CommandNotFound(f"{command[0]!r} is not executable") from None

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    # Ctrl-C reaches the child through the terminal's process group; TERM and HUP (a scheduler
    # ending the job) are passed on, so the script can shut down as it would without us.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def launch(command: Sequence[str], *, run: str | None, rules: Path | None, home: Path | None,
           on_stop: str, quiet: bool = False, batch_size: str = "auto", batch_dim: int | None = None) -> int:
    from gradwatch.probes.autostart import autostart_enabled, ensure_agent
    from gradwatch.rules.config import rules_from
    from gradwatch.spool.format import SpoolLayout, default_home

    if rules is not None:
        rules_from(rules)  # a bad rules file is reported now, not from inside every rank
    run = run or default_run_name(command)
    env = child_environment(run, rules, home, on_stop, batch_size=batch_size, batch_dim=batch_dim)
    layout = SpoolLayout(Path(env.get("GRADWATCH_HOME") or default_home()).expanduser())
    started = ensure_agent(layout) if autostart_enabled() else False
    if not quiet:
        print(f"gradwatch: watching run {run!r}" + (" (started the agent)" if started else "")
              + "; `gradwatch status` shows it", file=sys.stderr)
    return run_command(command, env)
