"""Who this process is: rank, world size, run name and the launch key shared by its ranks."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ProcessIdentity:
    rank: int
    local_rank: int
    world_size: int
    host: str
    pid: int
    start_time: float
    launch_key: str  # equal on every rank of one launch on this host, different between launches
    worker: str = ""  # a multiprocessing worker without a rank (Hogwild): its process name; its rank is its index


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else None


def shared_launch_id() -> str | None:
    """A launch id rank 0 makes up and broadcasts, for launchers whose ranks share no parent process
    (Lightning's DDP starts ranks 1.. from rank 0). A collective: every rank must call it. None
    without an initialised process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    box = [f"{socket.gethostname()}:{os.getpid()}:{time.time()}"]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def detect_identity(rank: int | None = None, world_size: int | None = None,
                    launch_id: str | None = None) -> ProcessIdentity:
    """Rank and world size from the arguments, else torch.distributed, else the launcher's env vars."""
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    host = socket.gethostname()
    worker = _unranked_worker() if rank is None and _env_int("RANK") is None else None
    if worker is not None:  # Hogwild: the workers of one parent are one run, each its own "rank"
        rank, name, parent = worker
        world_size = world_size if world_size is not None else 1
    rank = rank if rank is not None else (_env_int("RANK") or 0)
    world_size = world_size if world_size is not None else (_env_int("WORLD_SIZE") or 1)
    local_rank = _env_int("LOCAL_RANK")
    pid = os.getpid()
    start_time = time.time()
    explicit = launch_id or os.environ.get("GRADWATCH_RUN_ID")
    if explicit:
        key = explicit
    elif worker is not None:
        key = f"{host}:mp-workers-of:{parent}"
    elif world_size > 1:
        # every machine of the launch: the scheduler's or torchrun's own id; else the ranks one launcher (torchrun,
        # mp.spawn, srun) started on this host share these
        key = cluster_launch_id() or ":".join(
            [host, str(os.getppid()), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
             os.environ.get("TORCHELASTIC_RUN_ID", "")]
        )
    else:
        key = f"{host}:{pid}:{start_time}"
    return ProcessIdentity(
        rank=rank,
        local_rank=local_rank if local_rank is not None else rank,
        world_size=world_size,
        host=host,
        pid=pid,
        start_time=start_time,
        launch_key=hashlib.sha1(key.encode()).hexdigest()[:16],
        worker=name if worker is not None else "",
    )


def cluster_launch_id() -> str | None:
    """What the launcher gives every process of one launch on every machine: SLURM's job, step and requeue
    count, else torchrun's rendezvous id (``--rdzv-id``; random with ``--standalone``) and restart count.
    None when there is neither (torchrun's static rendezvous without an id, mp.spawn)."""
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm:" + ":".join(os.environ.get(k, "") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID",
                                                                   "SLURM_RESTART_COUNT"))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"torchelastic:{run_id}:{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return None


def _unranked_worker() -> tuple[int, str, int] | None:
    """(index, process name, parent pid) of a process ``multiprocessing`` (or ``torch.multiprocessing``)
    started, which has no rank of its own: Hogwild workers training one shared model. Its index among
    its parent's children (``Process-3`` is 2) keeps the siblings' records apart in one run."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return None
    identity: tuple[int, ...] = tuple(getattr(multiprocessing.current_process(), "_identity", ()))
    if len(identity) != 1:
        return None  # a pool's worker, or nested: no stable index
    return int(identity[0]) - 1, multiprocessing.current_process().name, int(parent.pid)


def default_run_name(identity: ProcessIdentity) -> str:
    """``$GRADWATCH_RUN``, else ``<script>-<6 hex of the launch key>`` (the same on every rank)."""
    explicit = os.environ.get("GRADWATCH_RUN")
    if explicit:
        return explicit
    script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] not in ("", "-c") else "python"
    return f"{script}-{identity.launch_key[:6]}"
