"""The NVML GPU collector. NVML is faked (tests/support/fake_nvml.py): these machines have no GPU.
On a lent GPU machine the collector runs against the real NVML (docs/benchmarks.md)."""

from __future__ import annotations

import logging
import threading

import pytest

from gradwatch.agent.gpus import GpuCollector, same_gpu
from tests.agent.helpers import FakeClock
from tests.support.fake_nvml import FakeGpu, FakeNvml, NVMLError


def read(nvml: FakeNvml, **kwargs: object) -> GpuCollector:
    collector = GpuCollector(nvml, **kwargs)  # type: ignore[arg-type]
    collector.refresh()
    return collector


def test_every_reading_is_converted_to_base_units() -> None:
    gpu = read(FakeNvml([FakeGpu(uuid="GPU-x", pids=[42, 43])])).sample()[0]
    assert (gpu.gpu, gpu.uuid, gpu.name) == ("0", "GPU-x", "NVIDIA H100 80GB HBM3")
    assert gpu.utilization == pytest.approx(0.87)
    assert (gpu.memory_used, gpu.memory_total) == (30 * 2**30, 80 * 2**30)
    assert gpu.power_watts == 350.0 and gpu.temperature_celsius == 61.0 and gpu.sm_clock_hertz == 1.98e9
    assert gpu.throttled["power_cap"] and not gpu.throttled["thermal"]
    assert gpu.pids == [42, 43]


def test_a_reading_the_gpu_does_not_support_is_left_out() -> None:
    gpu = read(FakeNvml([FakeGpu(power_mw=None)])).sample()[0]
    assert gpu.power_watts is None and gpu.temperature_celsius == 61.0


def test_mig_instances_are_reported_beside_their_gpu() -> None:
    """In MIG mode the parent GPU does not report utilisation per instance: each instance is a device of its own,
    with its UUID, memory and processes (nvmlDeviceGetMigDeviceHandleByIndex)."""
    instances = [FakeGpu(uuid=f"MIG-{i}", utilization=None, memory_total=10 * 2**30, memory_used=i * 2**30,
                         pids=[100 + i]) for i in range(2)]
    nvml = FakeNvml([FakeGpu(uuid="GPU-parent", utilization=None, mig=instances), FakeGpu(uuid="GPU-plain")])
    samples = read(nvml).sample()
    assert [(s.gpu, s.uuid) for s in samples] == [("0", "GPU-parent"), ("0/0", "MIG-0"), ("0/1", "MIG-1"),
                                                  ("1", "GPU-plain")]
    first = samples[1]
    assert first.utilization is None and first.memory_total == 10 * 2**30 and first.pids == [100]


@pytest.mark.parametrize("nvml, state", [
    (FakeNvml([]), "no GPUs: NVML sees none"),
    (FakeNvml([FakeGpu()], init_error=NVMLError("Driver Not Loaded")),
     "no GPUs: NVML is not available (Driver Not Loaded); retrying every 30 s"),
])
def test_no_gpu_is_a_clear_state_without_noise(nvml: FakeNvml, state: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "gradwatch")
    collector = read(nvml)
    collector.refresh()
    assert collector.state == state and collector.count == 0 and collector.sample() == []
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # one line, at info


def test_a_failed_nvml_init_is_retried_every_30_seconds(caplog: pytest.LogCaptureFixture) -> None:
    """A driver loaded (or a GPU container started) after the agent: the GPUs appear without a restart."""
    caplog.set_level(logging.INFO, "gradwatch")
    clock = FakeClock(0.0)
    nvml = FakeNvml([FakeGpu()], init_error=NVMLError("Driver Not Loaded"))
    collector = read(nvml, clock=clock)
    nvml.init_error = None
    clock.advance(10)
    collector.refresh()
    assert nvml.init_calls == 1 and collector.count == 0  # not before its time
    clock.advance(21)
    collector.refresh()
    assert nvml.init_calls == 2 and collector.count == 1 and len(collector.sample()) == 1
    assert [r.getMessage() for r in caplog.records][-1] == "GPU collector: 1 GPU(s) through NVML"


def test_scrapes_share_the_last_reading() -> None:
    nvml = FakeNvml([FakeGpu(utilization=10)])
    collector = read(nvml)
    nvml.gpus[0].utilization = 90
    assert collector.sample()[0].utilization == pytest.approx(0.10)  # a scrape calls no NVML
    collector.refresh()
    assert collector.sample()[0].utilization == pytest.approx(0.90)


def test_a_wedged_gpu_costs_the_gpu_series_not_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    """NVML calls that never return block the sampling thread only: a scrape gets the last reading, none once it is
    10 s old (said once), and the readings come back when NVML answers again."""
    caplog.set_level(logging.INFO, "gradwatch")
    clock = FakeClock(0.0)
    nvml = FakeNvml([FakeGpu(utilization=10)])
    collector = read(nvml, clock=clock, every=0.01)
    nvml.hang = threading.Event()
    collector.start()  # its first refresh now waits in NVML
    try:
        assert nvml.waiting.wait(30)
        clock.advance(5)
        assert collector.sample()[0].utilization == pytest.approx(0.10)  # the last reading, at once
        clock.advance(6)
        assert collector.sample() == [] and collector.sample() == []
        assert collector.state == "NVML has not answered for 11 s: the GPU series are left out until it does"
        assert sum("has not answered" in r.getMessage() for r in caplog.records) == 1
        nvml.gpus[0].utilization = 50
    finally:
        nvml.hang.set()
    for _ in range(500):
        if collector.sample():
            break
        threading.Event().wait(0.01)
    assert collector.sample()[0].utilization == pytest.approx(0.50)
    assert collector.state == "1 GPU(s) through NVML"
    collector.close()
    assert nvml.shutdown


def test_disabled_collector_never_touches_nvml() -> None:
    nvml = FakeNvml([FakeGpu()], init_error=AssertionError("must not be called"))
    collector = read(nvml, enabled=False)
    collector.start()
    assert collector.state.startswith("disabled") and collector.sample() == [] and nvml.init_calls == 0


@pytest.mark.parametrize("torch_uuid, nvml_uuid, same", [
    ("8f3c2a10-1b2c-4d5e-8f90-0123456789ab", "GPU-8f3c2a10-1b2c-4d5e-8f90-0123456789ab", True),
    ("MIG-5e3a1b7c-aaaa-bbbb-cccc-000000000001", "MIG-5e3a1b7c-aaaa-bbbb-cccc-000000000001", True),
    ("8F3C2A10-1B2C-4D5E-8F90-0123456789AB", "GPU-8f3c2a10-1b2c-4d5e-8f90-0123456789ab", True),
    ("8f3c2a10-1b2c-4d5e-8f90-0123456789ab", "GPU-8f3c2a10-1b2c-4d5e-8f90-0123456789ac", False),
    ("", "GPU-", False),
])
def test_torch_and_nvml_spellings_of_one_uuid_match(torch_uuid: str, nvml_uuid: str, same: bool) -> None:
    assert same_gpu(torch_uuid, nvml_uuid) is same


def test_the_real_collector_says_why_there_are_no_gpus_here() -> None:
    collector = read(None)  # type: ignore[arg-type]  # the real nvidia-ml-py: here it cannot load NVML
    if collector.count:
        pytest.skip("this machine has GPUs (covered by the GPU checks in docs/benchmarks.md)")
    assert collector.state.startswith("no GPUs:")
