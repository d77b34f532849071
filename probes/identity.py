"""Who this process is: rank, world size, run name and the launch key shared by its ranks."""

from __future__ import annotations

import hashlib
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
    rank = rank if rank is not None else (_env_int("RANK") or 0)
    world_size = world_size if world_size is not None else (_env_int("WORLD_SIZE") or 1)
    local_rank = _env_int("LOCAL_RANK")
    host = socket.gethostname()
    pid = os.getpid()
    start_time = time.time()
    explicit = launch_id or os.environ.get("GRADWATCH_RUN_ID")
    if explicit:
        key = explicit
    elif world_size > 1:
        # Ranks started by one launcher (torchrun, mp.spawn, srun) on a host share these.
        key = ":".join(
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
    )


def default_run_name(identity: ProcessIdentity) -> str:
    """``$GRADWATCH_RUN``, else ``<script>-<6 hex of the launch key>`` (the same on every rank)."""
    explicit = os.environ.get("GRADWATCH_RUN")
    if explicit:
        return explicit
    script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] not in ("", "-c") else "python"
    return f"{script}-{identity.launch_key[:6]}"
