"""Where each rank of a run is, now: ``gradwatch stacks RUN`` (and the agent, on a stall) signals every rank of the
run on this machine to dump its threads' stacks (probes/stacks.py), reads the dumps, and says it in words, the
ranks whose training threads stand in the same place grouped, the odd one out first.

Only a process whose metadata names its dump signal, on this host and in this pid namespace, whose start time still
matches the metadata's (a pid reused by another process is left alone) and that belongs to the owner of its
metadata file is signalled: the signal's default action is to end a process, so a stranger is never sent it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from gradwatch.history import run_directory
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.proc import judges_pid, process_start_ticks
from gradwatch.spool.reader import SpoolFormatError, read_meta
from gradwatch.spool.records import RunMeta

MAX_DUMP_BYTES = 1 << 20  # of one dump read back
_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\):$")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')
#: frames of these libraries are the machinery; the innermost frame outside them is where the script is
_LIBRARY = ("/site-packages/", "/dist-packages/", "/lib/python3", "<frozen ")


@functools.cache
def _our_dirs() -> tuple[str, ...]:
    """gradwatch's own package directories (an editable install keeps them outside site-packages)."""
    dirs = []
    for name in ("gradwatch", "gradwatch.probes", "gradwatch.spool", "gradwatch.rules", "gradwatch.agent"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            dirs += [str(Path(d)) + os.sep for d in spec.submodule_search_locations or []]
    return tuple(dirs)


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str

    @property
    def library(self) -> bool:
        return any(part in self.file for part in _LIBRARY) or self.file.startswith(_our_dirs())

    def short(self) -> str:
        path = self.file
        for marker in ("/site-packages/", "/dist-packages/"):
            if marker in path:
                path = path.split(marker, 1)[1]
        return f"{Path(path).name if not self.library else path}:{self.line}"


@dataclass
class RankStacks:
    rank: int
    pid: int
    threads: dict[int, list[Frame]] = field(default_factory=dict)  # thread ident -> frames, innermost first
    main_thread: int = 0
    error: str = ""  # why there is no dump

    @property
    def main(self) -> list[Frame]:
        return self.threads.get(self.main_thread) or next(iter(self.threads.values()), [])

    def where(self) -> str:
        """``in `load_batch` (train.py:88) <- `__next__` (torch/utils/data/dataloader.py:631)``, with the
        script's own innermost frame when the innermost ones are a library's."""
        frames = self.main
        if not frames:
            return self.error or "no stack"
        inner = frames[:2]
        text = " <- ".join(f"`{f.function}` ({f.short()})" for f in inner)
        own = next((f for f in frames if not f.library), None)
        if own is not None and own not in inner:
            text += f", from `{own.function}` ({own.short()})"
        if any(f.function == "_engine_run_backward" or (f.file.endswith("torch/autograd/__init__.py")
               and f.function == "backward") for f in frames):
            text += " (inside autograd's backward pass: under DDP, where its gradient all-reduce waits)"
        return text


def parse_dump(text: str) -> dict[int, list[Frame]]:
    """faulthandler's dump: per thread, its frames innermost first."""
    threads: dict[int, list[Frame]] = {}
    current: list[Frame] | None = None
    for line in text.splitlines():
        head = _THREAD.match(line)
        if head:
            current = threads.setdefault(int(head.group(2), 16), [])
            continue
        frame = _FRAME.match(line)
        if frame and current is not None:
            current.append(Frame(frame.group(1), int(frame.group(2)), frame.group(3)))
        elif not line.strip():
            current = None
    return threads


def _signalable(meta: RunMeta, meta_file: Path, local_host: str) -> str:
    """Why this rank's process must not be signalled ("" when it may)."""
    if not meta.stack_signal:
        return ("its probe dumps no stacks (GRADWATCH_STACK_DUMPS=1 not set, an older gradwatch, or another probe of "
                "the process)")
    if not judges_pid(meta.host, meta.pid, meta.pid_namespace, local_host):
        return f"it runs on host {meta.host or '?'} (ask that host's agent, or run gradwatch stacks there)"
    if meta.proc_start_ticks is not None and process_start_ticks(meta.pid) != meta.proc_start_ticks:
        return "its process has ended"
    try:
        if os.stat(f"/proc/{meta.pid}").st_uid != meta_file.stat().st_uid:
            return "its process does not belong to the owner of its metadata"
    except OSError:
        return "its process has ended"
    return ""


def collect(run: str, home: str | Path | None, timeout: float = 3.0, local_host: str | None = None) -> list[RankStacks]:
    """Signal every rank of ``run`` on this machine and read back what each wrote (until its dump stops growing,
    ``timeout`` at most)."""
    run_dir = run_directory(run, home)
    host = local_host if local_host is not None else socket.gethostname()
    pending: list[tuple[RankStacks, Path, int]] = []
    out: list[RankStacks] = []
    for meta_file in sorted(run_dir.glob("rank-*.meta.json")):
        try:
            meta = read_meta(meta_file)
        except SpoolFormatError:
            continue  # not a rank's metadata (gradwatch status says which and why)
        stacks = RankStacks(meta.rank, meta.pid, main_thread=meta.main_thread)
        out.append(stacks)
        stacks.error = _signalable(meta, meta_file, host)
        if stacks.error:
            continue
        dump = SpoolLayout.stacks_file(run_dir, meta.rank)
        offset = dump.stat().st_size if dump.exists() else 0
        try:
            os.kill(meta.pid, meta.stack_signal)
        except OSError as exc:
            stacks.error = f"could not signal pid {meta.pid}: {exc.strerror or exc}"
            continue
        pending.append((stacks, dump, offset))
    _read_back(pending, timeout)
    return sorted(out, key=lambda s: s.rank)


def _read_back(pending: list[tuple[RankStacks, Path, int]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    sizes: dict[int, int] = {}
    while pending and time.monotonic() < deadline:
        time.sleep(0.1)
        still = []
        for stacks, dump, offset in pending:
            size = dump.stat().st_size if dump.exists() else offset
            if size > offset and sizes.get(stacks.rank) == size:  # written and no longer growing
                with open(dump, "rb") as f:
                    f.seek(offset)
                    stacks.threads = parse_dump(f.read(MAX_DUMP_BYTES).decode("utf-8", "replace"))
                if not stacks.threads:
                    stacks.error = "its dump could not be read"
                continue
            sizes[stacks.rank] = size
            still.append((stacks, dump, offset))
        pending = still
    for stacks, _, _ in pending:
        stacks.error = f"no dump within {timeout:g} s (the process may be stopped, or not ours)"


def _ranks_text(ranks: list[int]) -> str:
    """``0-2 and 4-7``."""
    spans: list[list[int]] = []
    for rank in sorted(ranks):
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in spans]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def grouped(stacks: list[RankStacks]) -> list[list[RankStacks]]:
    """Ranks whose training threads stand at the same frames, the smallest group (the odd one out) first."""
    groups: dict[tuple[object, ...], list[RankStacks]] = {}
    for s in stacks:
        key: tuple[object, ...] = tuple((f.file, f.line, f.function) for f in s.main) or (s.error,)
        groups.setdefault(key, []).append(s)
    return sorted(groups.values(), key=lambda members: (len(members), members[0].rank))


def summary(run: str, stacks: list[RankStacks]) -> str:
    """One line: ``run ddp: rank 3 in `load_batch` (train.py:88) ...; ranks 0-2 and 4-7 in ...``."""
    parts = []
    for members in grouped(stacks):
        ranks = [m.rank for m in members]
        where = members[0].where()
        parts.append(f"{'rank' if len(ranks) == 1 else 'ranks'} {_ranks_text(ranks)} "
                     + (f"in {where}" if members[0].main else f"unknown: {where}"))
    return f"run {run}: " + "; ".join(parts)


def report(run: str, stacks: list[RankStacks], full: bool = False, frames: int = 12) -> list[str]:
    """What ``gradwatch stacks`` prints: the summary, then each group's training-thread stack (innermost first;
    ``full``: every frame, and the ranks' other threads)."""
    lines = [summary(run, stacks)]
    for members in grouped(stacks):
        first = members[0]
        lines.append("")
        lines.append(f"{'rank' if len(members) == 1 else 'ranks'} {_ranks_text([m.rank for m in members])} "
                     f"(pid {', '.join(str(m.pid) for m in members)}):")
        if not first.main:
            lines.append(f"  {first.error}")
            continue
        shown = first.main if full else first.main[:frames]
        lines += [f'  File "{f.file}", line {f.line} in {f.function}' for f in shown]
        if len(shown) < len(first.main):
            lines.append(f"  ... {len(first.main) - len(shown)} more (--full)")
        if full:
            for ident, other in first.threads.items():
                if other is not first.main:
                    lines.append(f"  thread 0x{ident:x}:")
                    lines += [f'    File "{f.file}", line {f.line} in {f.function}' for f in other]
    return lines
