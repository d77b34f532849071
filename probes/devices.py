"""The CUDA devices a probe's process trains on: which, their UUIDs (how the agent finds them in NVML)
and their allocators' counters. Read on the writer thread; nothing here runs on the training thread."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gradwatch.spool.records import CudaMemory


def parameter_devices(params: Iterable[torch.Tensor]) -> list[int]:
    """The CUDA device indices the parameters are on, in order of first appearance (empty: none on CUDA). Read
    at attach: a model moved to its GPUs after ``attach`` (rare: the optimizer usually comes after ``.to()``) is
    seen only through the current device, which the writer thread adds."""
    seen: dict[int, None] = {}
    for p in params:
        if p.is_cuda:
            seen.setdefault(p.device.index if p.device.index is not None else torch.cuda.current_device())
    return list(seen)


def gpu_uuids(devices: Iterable[int]) -> list[str]:
    """The devices' UUIDs as the CUDA runtime reports them (NVML writes the same with a ``GPU-``/``MIG-``
    prefix); a device whose properties cannot be read is left out."""
    out = []
    for index in devices:
        try:
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        except Exception:  # a device that cannot be asked is one the agent cannot match: left out
            continue
        if uuid is not None:
            out.append(str(uuid))
    return out


def fullest_memory(devices: Iterable[int]) -> CudaMemory | None:
    """The caching allocator's counters of the device nearest to its limit (reserved ÷ total): the one that runs
    out first, which is what the memory alerts are about. Host-side counters: no synchronisation."""
    best: tuple[float, CudaMemory] | None = None
    for index in devices:
        stats = torch.cuda.memory_stats(index)
        total = torch.cuda.get_device_properties(index).total_memory
        memory = CudaMemory(allocated=stats.get("allocated_bytes.all.current", 0),
                            reserved=stats.get("reserved_bytes.all.current", 0),
                            peak=stats.get("allocated_bytes.all.peak", 0), total=total, device=index)
        fill = (memory.reserved or 0) / total if total else 0.0
        if best is None or fill > best[0]:
            best = (fill, memory)
    return best[1] if best is not None else None

