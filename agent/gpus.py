"""The machine's GPUs through NVML, each labelled with the gradwatch run whose process uses it.

The DCGM exporter reports GPUs; only gradwatch knows which training process (run and rank) is
on each. NVML lists the processes of every GPU and the runs' metadata has their pids, so each
GPU series carries ``run`` and ``rank``. Without NVML (no driver, no ``nvidia-ml-py``) or without
GPUs the collector reports "no GPUs" once, at info level, and exports nothing per GPU.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger("gradwatch.agent")

#: NVML clock-event ("throttle") reason bits we report, by the name in the ``reason`` label.
THROTTLE_REASONS = {
    "power_cap": 0x04,  # SwPowerCap
    "hw_slowdown": 0x08,
    "sync_boost": 0x10,
    "thermal": 0x20 | 0x40,  # SwThermalSlowdown | HwThermalSlowdown
    "power_brake": 0x80,
    "app_clocks": 0x02,  # ApplicationsClocksSetting
}
_TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU
_CLOCK_SM = 1  # NVML_CLOCK_SM
_CACHE_SECONDS = 1.0  # scrapes closer together than this share one sample


@dataclass
class GpuSample:
    index: int
    uuid: str
    name: str
    utilization: float | None = None  # 0..1
    memory_used: float | None = None  # bytes
    memory_total: float | None = None
    power_watts: float | None = None
    temperature_celsius: float | None = None
    sm_clock_hertz: float | None = None
    throttled: dict[str, bool] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)


class GpuCollector:
    """Samples every GPU; ``state`` says why there are none. ``nvml`` is the ``pynvml`` module of
    nvidia-ml-py (tests pass a fake of the few calls used here)."""

    def __init__(self, nvml: ModuleType | Any | None = None, enabled: bool = True) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._count = 0
        self._cached: tuple[float, list[GpuSample]] = (0.0, [])
        self.state = "disabled (gpu_collector: false)" if not enabled else self._init(nvml)
        log.info("GPU collector: %s", self.state)

    def _init(self, nvml: Any) -> str:
        try:
            if nvml is None:
                import pynvml  # nvidia-ml-py

                nvml = pynvml
            nvml.nvmlInit()
            self._count = int(nvml.nvmlDeviceGetCount())
        except ImportError:
            return "no GPUs: nvidia-ml-py is not installed"
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            return f"no GPUs: NVML is not available ({exc})"
        self._nvml = nvml
        return f"{self._count} GPU(s) through NVML" if self._count else "no GPUs: NVML sees none"

    @property
    def count(self) -> int:
        return self._count if self._nvml is not None else 0

    def sample(self, now: float | None = None) -> list[GpuSample]:
        """Every GPU's readings (cached for a second); a reading a GPU does not support is None."""
        if self._nvml is None or not self._count:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._cached[0] < _CACHE_SECONDS and self._cached[1]:
                return self._cached[1]
            samples = [s for i in range(self._count) if (s := self._sample_one(i)) is not None]
            self._cached = (now, samples)
            return samples

    def _sample_one(self, index: int) -> GpuSample | None:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            sample = GpuSample(index, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)))
        except Exception as exc:
            log.debug("GPU %d: %s", index, exc)
            return None  # e.g. fallen off the bus; the others are still reported

        def read(fn: str, *args: Any) -> Any:
            try:
                return getattr(nvml, fn)(handle, *args)
            except Exception:  # NVMLError_NotSupported and friends: that reading is left out
                return None

        if (util := read("nvmlDeviceGetUtilizationRates")) is not None:
            sample.utilization = util.gpu / 100.0
        if (memory := read("nvmlDeviceGetMemoryInfo")) is not None:
            sample.memory_used, sample.memory_total = float(memory.used), float(memory.total)
        if (milliwatts := read("nvmlDeviceGetPowerUsage")) is not None:
            sample.power_watts = milliwatts / 1000.0
        if (celsius := read("nvmlDeviceGetTemperature", _TEMPERATURE_GPU)) is not None:
            sample.temperature_celsius = float(celsius)
        if (mhz := read("nvmlDeviceGetClockInfo", _CLOCK_SM)) is not None:
            sample.sm_clock_hertz = mhz * 1e6
        if (reasons := read("nvmlDeviceGetCurrentClocksThrottleReasons")) is not None:
            sample.throttled = {name: bool(int(reasons) & bits) for name, bits in THROTTLE_REASONS.items()}
        for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            sample.pids += [int(p.pid) for p in read(fn) or []]
        return sample

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # the driver may be gone already; nothing to do about it
                self._nvml.nvmlShutdown()
            self._nvml = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
