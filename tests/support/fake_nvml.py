"""A fake of the few NVML calls agent/gpus.py makes (nvidia-ml-py's ``pynvml``), for machines
without a GPU. It is a fake, not NVML: GPU tests on real hardware run only where a GPU is lent.

``FakeNvml(gpus=[FakeGpu(...)])``; a GPU lists the pids in ``pids``; a GPU in MIG mode lists its instances in
``mig`` (each a ``FakeGpu``, whose utilisation NVML does not support); ``FakeNvml.hang`` (an Event) makes every
reading wait for it, as a wedged GPU does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    utilization: int | None = 87  # percent; None: not supported (a MIG instance)
    memory_used: int = 30 * 2**30
    memory_total: int = 80 * 2**30
    power_mw: int | None = 350_000  # None: not supported
    temperature: int = 61
    sm_mhz: int = 1980
    throttle_reasons: int = 0x04  # SwPowerCap
    pids: list[int] = field(default_factory=list)
    mig: list[FakeGpu] | None = None  # MIG mode: its instances


class NVMLError_NotFound(NVMLError):
    pass


class FakeNvml:
    def __init__(self, gpus: list[FakeGpu], init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.shutdown = False
        self.hang: threading.Event | None = None
        self.waiting = threading.Event()  # set once a call waits for ``hang``
        self.init_calls = 0

    def __getattribute__(self, name: str) -> Any:
        hang = object.__getattribute__(self, "hang")
        if hang is not None and name.startswith("nvmlDevice"):
            object.__getattribute__(self, "waiting").set()
            hang.wait()
        return object.__getattribute__(self, name)

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return gpu.uuid

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> bytes:
        return gpu.name.encode()

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> SimpleNamespace:
        if gpu.utilization is None:
            raise NVMLError_NotSupported("Not Supported")
        return SimpleNamespace(gpu=gpu.utilization, memory=40)

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(used=gpu.memory_used, total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used)

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        if gpu.power_mw is None:
            raise NVMLError_NotSupported("Not Supported")
        return gpu.power_mw

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        return gpu.temperature

    def nvmlDeviceGetClockInfo(self, gpu: FakeGpu, clock: int) -> int:
        assert clock == 1  # NVML_CLOCK_SM
        return gpu.sm_mhz

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, gpu: FakeGpu) -> int:
        return gpu.throttle_reasons

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=2**30) for pid in gpu.pids]

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return []

    def nvmlDeviceGetMigMode(self, gpu: FakeGpu) -> list[int]:
        if not any(gpu is g for g in self.gpus):
            raise NVMLError_NotSupported("Not Supported")  # asked of a MIG instance
        return [1, 1] if gpu.mig is not None else [0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, gpu: FakeGpu) -> int:
        return 7 if gpu.mig is not None else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu: FakeGpu, index: int) -> FakeGpu:
        if gpu.mig is None or index >= len(gpu.mig):
            raise NVMLError_NotFound("Not Found")
        return gpu.mig[index]
