"""The machine's GPUs through NVML, each labelled with the gradwatch run whose process uses it.

The DCGM exporter reports GPUs; only gradwatch knows which training process (run and rank) is
on each. A run's metadata lists the UUIDs of the GPUs its process uses (``gpu_uuids``), which match
``nvmlDeviceGetUUID`` whatever pid namespace the trainer lives in (a container or a pod writes its own
pids, which the driver never reports); for older probes, NVML's process list is matched to the
metadata's pid, only when the process shares the agent's pid namespace.

NVML is read on a thread of its own, once a second, and a scrape serves the last reading: a wedged GPU
(an NVML call that never returns) costs the GPU series, not ``/metrics``. MIG instances are reported
beside their GPU (``gpu="0/1"``, their own UUID). Without NVML (no driver, no ``nvidia-ml-py``) or
without GPUs the collector says why once, at info level, and exports nothing per GPU; a failed
``nvmlInit`` is retried (a driver loaded after the agent started).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
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
_MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE
SAMPLE_EVERY_SECONDS = 1.0
STALE_AFTER_SECONDS = 10.0  # a reading older than this is not served (NVML stopped answering)
RETRY_INIT_SECONDS = 30.0


def same_gpu(a: str, b: str) -> bool:
    """Whether two GPU UUIDs name one device: NVML writes ``GPU-<uuid>`` (``MIG-<uuid>`` for an instance),
    torch's ``get_device_properties(i).uuid`` the bare UUID."""
    return normal_uuid(a) == normal_uuid(b) != ""


def normal_uuid(uuid: str) -> str:
    uuid = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if uuid.startswith(prefix):
            return uuid[len(prefix):]
    return uuid


@dataclass
class GpuSample:
    gpu: str  # the ``gpu`` label: NVML's index, "<index>/<MIG index>" for a MIG instance
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
    """Samples every GPU (``refresh()``, on its own thread once ``start()``-ed); ``sample()`` gives the last
    reading; ``state`` says why there are none. ``nvml`` is the ``pynvml`` module of nvidia-ml-py (tests pass
    a fake of the few calls used here)."""

    def __init__(self, nvml: ModuleType | Any | None = None, enabled: bool = True, *,
                 clock: Callable[[], float] = time.monotonic, every: float = SAMPLE_EVERY_SECONDS,
                 stale_after: float = STALE_AFTER_SECONDS, retry_init: float = RETRY_INIT_SECONDS) -> None:
        self._given = nvml
        self._enabled = enabled
        self._clock = clock
        self._every, self._stale_after, self._retry_init = every, stale_after, retry_init
        self._nvml: Any = None
        self._count = 0
        self._next_init = 0.0
        self._samples: list[GpuSample] = []
        self._sampled_at: float | None = None  # when the last refresh finished
        self._refresh_started: float | None = None  # set while a refresh is in NVML
        self._stale_reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = "disabled (gpu_collector: false)" if not enabled else "starting"
        if not enabled:
            log.info("GPU collector: %s", self.state)

    # -- the sampling thread --------------------------------------------------------------------
    def start(self) -> None:
        if self._enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gradwatch-gpus", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # never the agent's end: the GPU series are left out until NVML answers again
                log.debug("GPU collector", exc_info=True)
            self._stop.wait(self._every)

    def refresh(self) -> None:
        """Initialise NVML if it is not (again, every ``retry_init`` seconds after a failure), then read every GPU."""
        if not self._enabled:
            return
        now = self._clock()
        if self._nvml is None:
            if now < self._next_init:
                return
            self._initialise(now)
            if self._nvml is None:
                return
        self._refresh_started = now
        try:
            samples: list[GpuSample] = []
            for index in range(self._count):
                samples += self._sample_gpu(index)
        finally:
            self._refresh_started = None
        self._samples, self._sampled_at = samples, self._clock()
        if self._stale_reported:
            self._stale_reported = False
            self.state = self._counted()
            log.info("GPU collector: NVML answers again; %s", self.state)

    def _initialise(self, now: float) -> None:
        before = self.state
        try:
            nvml = self._given
            if nvml is None:
                import pynvml  # nvidia-ml-py

                nvml = pynvml
            nvml.nvmlInit()
            self._count = int(nvml.nvmlDeviceGetCount())
        except ImportError:
            self.state = "no GPUs: nvidia-ml-py is not installed"
            self._next_init = float("inf")  # installing it needs a restart anyway
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.state = f"no GPUs: NVML is not available ({exc}); retrying every {self._retry_init:g} s"
            self._next_init = now + self._retry_init
        else:
            self._nvml = nvml
            self.state = self._counted()
        if self.state != before:
            log.info("GPU collector: %s", self.state)

    def _counted(self) -> str:
        return f"{self._count} GPU(s) through NVML" if self._count else "no GPUs: NVML sees none"

    # -- what a scrape reads ----------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self._count if self._nvml is not None else 0

    @property
    def sampled_at(self) -> float | None:
        """When the last complete reading was taken (this collector's clock); None before the first."""
        return self._sampled_at

    def reading_age(self) -> float | None:
        """Seconds since the last complete reading; None before the first (or without GPUs)."""
        return self._clock() - self._sampled_at if self._sampled_at is not None and self._count else None

    def sample(self) -> list[GpuSample]:
        """The last reading of every GPU; none once it is older than ``stale_after`` (NVML stopped answering:
        said once per episode, in the log and in ``state``)."""
        if self._sampled_at is None:
            return []
        age = self._clock() - self._sampled_at
        if age <= self._stale_after:
            return self._samples
        if not self._stale_reported:
            self._stale_reported = True
            stuck = self._refresh_started is not None
            self.state = (f"NVML has not answered for {age:.0f} s: the GPU series are left out until it does"
                          if stuck else f"no GPU reading for {age:.0f} s")
            log.warning("GPU collector: %s", self.state)
        return []

    # -- reading one GPU ---------------------------------------------------------------------------
    def _sample_gpu(self, index: int) -> list[GpuSample]:
        """The GPU and, in MIG mode, each of its instances (whose utilisation NVML does not report)."""
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            log.debug("GPU %d: %s", index, exc)
            return []  # e.g. fallen off the bus; the others are still reported
        parent = self._sample_handle(handle, str(index))
        if parent is None:
            return []
        out = [parent]
        if _first(_call(nvml, "nvmlDeviceGetMigMode", handle)) == _MIG_ENABLED:  # [current, pending]
            for mig in range(int(_call(nvml, "nvmlDeviceGetMaxMigDeviceCount", handle) or 0)):
                mig_handle = _call(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", handle, mig)
                if mig_handle is not None and (instance := self._sample_handle(mig_handle, f"{index}/{mig}")):
                    out.append(instance)
        return out

    def _sample_handle(self, handle: Any, label: str) -> GpuSample | None:
        nvml = self._nvml
        try:
            sample = GpuSample(label, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)))
        except Exception as exc:
            log.debug("GPU %s: %s", label, exc)
            return None

        def read(fn: str, *args: Any) -> Any:
            return _call(nvml, fn, handle, *args)

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
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            if self._thread.is_alive():
                return  # stuck in NVML: shutting it down under that call could only make it worse
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # the driver may be gone already; nothing to do about it
                self._nvml.nvmlShutdown()
            self._nvml = None


def _call(nvml: Any, fn: str, *args: Any) -> Any:
    """One NVML reading; None where it is not supported (NVMLError_NotSupported and friends) or not in this
    nvidia-ml-py."""
    try:
        return getattr(nvml, fn)(*args)
    except Exception:
        return None


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
