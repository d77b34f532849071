"""The NVML GPU collector. NVML is faked (tests/support/fake_nvml.py): these machines have no GPU.
On a lent GPU machine the collector runs against the real NVML (docs/benchmarks.md)."""

from __future__ import annotations

import logging

import pytest

from gradwatch.agent.gpus import GpuCollector
from tests.support.fake_nvml import FakeGpu, FakeNvml, NVMLError


def test_every_reading_is_converted_to_base_units() -> None:
    gpu = GpuCollector(FakeNvml([FakeGpu(uuid="GPU-x", pids=[42, 43])])).sample()[0]
    assert (gpu.index, gpu.uuid, gpu.name) == (0, "GPU-x", "NVIDIA H100 80GB HBM3")
    assert gpu.utilization == pytest.approx(0.87)
    assert (gpu.memory_used, gpu.memory_total) == (30 * 2**30, 80 * 2**30)
    assert gpu.power_watts == 350.0 and gpu.temperature_celsius == 61.0 and gpu.sm_clock_hertz == 1.98e9
    assert gpu.throttled["power_cap"] and not gpu.throttled["thermal"]
    assert gpu.pids == [42, 43]


def test_a_reading_the_gpu_does_not_support_is_left_out() -> None:
    gpu = GpuCollector(FakeNvml([FakeGpu(power_mw=None)])).sample()[0]
    assert gpu.power_watts is None and gpu.temperature_celsius == 61.0


@pytest.mark.parametrize("nvml, state", [
    (FakeNvml([]), "no GPUs: NVML sees none"),
    (FakeNvml([FakeGpu()], init_error=NVMLError("Driver Not Loaded")), "no GPUs: NVML is not available (Driver Not Loaded)"),
])
def test_no_gpu_is_a_clear_state_without_noise(nvml: FakeNvml, state: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "gradwatch")
    collector = GpuCollector(nvml)
    assert collector.state == state and collector.count == 0 and collector.sample() == []
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # one line, at info


def test_samples_are_shared_by_scrapes_within_a_second() -> None:
    nvml = FakeNvml([FakeGpu(utilization=10)])
    collector = GpuCollector(nvml)
    assert collector.sample(now=100.0)[0].utilization == pytest.approx(0.10)
    nvml.gpus[0].utilization = 90
    assert collector.sample(now=100.5)[0].utilization == pytest.approx(0.10)
    assert collector.sample(now=101.5)[0].utilization == pytest.approx(0.90)


def test_disabled_collector_never_touches_nvml() -> None:
    nvml = FakeNvml([FakeGpu()], init_error=AssertionError("must not be called"))
    collector = GpuCollector(nvml, enabled=False)
    assert collector.state.startswith("disabled") and collector.sample() == []


def test_the_real_collector_says_why_there_are_no_gpus_here() -> None:
    collector = GpuCollector()  # the real nvidia-ml-py: on a machine without the driver it cannot load NVML
    if collector.count:
        pytest.skip("this machine has GPUs (covered by the GPU checks in docs/benchmarks.md)")
    assert collector.state.startswith("no GPUs:")
