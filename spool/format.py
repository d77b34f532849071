"""Names, paths and versions of the run spool (see docs/spool-format.md)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

FORMAT_NAME = "gradwatch-spool"
#: major.minor. A reader refuses a newer *major*; a newer minor only adds fields.
FORMAT_VERSION = "1.9"

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_RANK_FILE = re.compile(r"^rank-(\d+)\.(meta\.json|records\.jsonl)$")


def default_home() -> Path:
    """``$GRADWATCH_HOME``, else ``$XDG_DATA_HOME/gradwatch``, else ``~/.local/share/gradwatch``."""
    explicit = os.environ.get("GRADWATCH_HOME")
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(data_home) / "gradwatch"


def safe_run_name(name: str) -> str:
    """A run name usable as a directory name and a label value: ``[A-Za-z0-9._-]``, at most 100 chars."""
    cleaned = _UNSAFE_NAME_CHARS.sub("-", name).strip("-.")[:100]
    return cleaned or "run"


def parse_major(version: str) -> int | None:
    """The major number of a ``"major.minor"`` version string, or None when it is not one."""
    head = str(version).split(".", 1)[0]
    return int(head) if head.isdigit() else None


def parse_rank_file(file_name: str) -> tuple[int, str] | None:
    """``("rank-3.records.jsonl")`` -> ``(3, "records.jsonl")``; None for files that are not per-rank."""
    match = _RANK_FILE.match(file_name)
    return (int(match.group(1)), match.group(2)) if match else None


@dataclass(frozen=True)
class SpoolLayout:
    """Where everything lives under one ``GRADWATCH_HOME``.

    ::

        <home>/runs/<run>/.claim               launch key of the run that owns the directory
        <home>/runs/<run>/rank-<r>.meta.json   metadata of the process with rank r
        <home>/runs/<run>/rank-<r>.records.jsonl  append-only records of rank r
        <home>/runs/<run>/control/commands.jsonl  commands of the agent to the run's probes
        <home>/runs/<run>/events.jsonl         the agent's decisions and what became of them
        <home>/agent/state.json                agent checkpoint (offsets + per-run state)
        <home>/agent/agent.json                the running agent: pid and URL
        <home>/agent/agent.lock                held by the running agent
    """

    home: Path

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def agent_dir(self) -> Path:
        return self.home / "agent"

    @property
    def checkpoint_file(self) -> Path:
        return self.agent_dir / "state.json"

    @property
    def agent_info_file(self) -> Path:
        return self.agent_dir / "agent.json"

    @property
    def agent_lock_file(self) -> Path:
        return self.agent_dir / "agent.lock"

    @property
    def agent_log_file(self) -> Path:
        return self.agent_dir / "agent.log"

    def run_dir(self, run: str) -> Path:
        return self.runs_dir / run

    @staticmethod
    def claim_file(run_dir: Path) -> Path:
        return run_dir / ".claim"

    @staticmethod
    def meta_file(run_dir: Path, rank: int) -> Path:
        return run_dir / f"rank-{rank}.meta.json"

    @staticmethod
    def records_file(run_dir: Path, rank: int) -> Path:
        return run_dir / f"rank-{rank}.records.jsonl"

    @staticmethod
    def stacks_file(run_dir: Path, rank: int) -> Path:
        """(1.9) where the process writes its threads' stacks on its ``stack_signal``."""
        return run_dir / f"rank-{rank}.stacks.txt"

    @staticmethod
    def commands_file(run_dir: Path) -> Path:
        return run_dir / "control" / "commands.jsonl"

    @staticmethod
    def events_file(run_dir: Path) -> Path:
        return run_dir / "events.jsonl"
