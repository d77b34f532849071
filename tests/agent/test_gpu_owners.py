"""Which run a GPU series names. NVML is faked (tests/support/fake_nvml.py; no GPU here). The driver reports
host-namespace pids, so a trainer in a container or a pod is found by the UUIDs of its GPUs (its metadata's
``gpu_uuids``, as torch spells them), and a pid is matched only where the agent shares the trainer's pid namespace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gradwatch.agent.collector import AgentCollector
from gradwatch.agent.gpus import GpuCollector, same_gpu
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.state import AgentState
from tests.agent.helpers import FakeClock, SpoolBuilder
from tests.support.fake_nvml import FakeGpu, FakeNvml

HOST = "node-7"
UUID = "8f3c2a10-1b2c-4d5e-8f90-0123456789ab"


def gpu_series(tmp_path: Path, gpus: list[FakeGpu], **runs: dict[str, object]) -> set[tuple[str, str, str]]:
    spool = SpoolBuilder(tmp_path)
    for run, meta in runs.items():
        spool.start(run, **meta)
        spool.steps(run, 0, 1, 2)
    state, clock = AgentState(spike_window=1e9), FakeClock()
    SpoolIngestor(spool.layout, state, clock, HOST).scan_all()
    state.refresh(clock(), stall_after=1e9, ended_ttl=1e9, local_host=HOST)
    collector = GpuCollector(FakeNvml(gpus))
    collector.refresh()
    scrape = AgentCollector(state, clock, gpus=collector, local_host=HOST).exposition().decode()
    out = set()
    for line in scrape.splitlines():
        if line.startswith("gradwatch_gpu_memory_used_bytes{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].split(","))
            out.add((labels["gpu"].strip('"'), labels["run"].strip('"'), labels["rank"].strip('"')))
    return out


def test_a_pods_run_is_found_by_its_gpus_uuid(tmp_path: Path) -> None:
    """The pod's hostname and pid (7) mean nothing to the agent; NVML lists the host pid (31337)."""
    series = gpu_series(tmp_path, [FakeGpu(uuid=f"GPU-{UUID}", pids=[31337]), FakeGpu(uuid="GPU-other")],
                        pod={"host": "trainer-pod-x7", "pid": 7, "pid_namespace": "pid:[4026532999]",
                             "gpu_uuids": [UUID]})
    assert series == {("0", "pod", "0"), ("1", "", "")}


def test_a_pid_from_another_namespace_is_never_matched(tmp_path: Path) -> None:
    """Host networking: the container's pid 4242 is, on the host, someone else's process on GPU 0."""
    series = gpu_series(tmp_path, [FakeGpu(uuid="GPU-a", pids=[4242])],
                        container={"host": HOST, "pid": 4242, "pid_namespace": "pid:[4026532999]"})
    assert series == {("0", "", "")}


def test_without_uuids_a_pid_in_the_agents_namespace_still_matches(tmp_path: Path) -> None:
    """A probe of format 1.6 (no ``gpu_uuids``), or a GPU torch could not name: NVML's pid list, as before."""
    series = gpu_series(tmp_path, [FakeGpu(uuid="GPU-a", pids=[os.getpid()]), FakeGpu(uuid="GPU-b")],
                        old={"host": HOST, "pid": os.getpid()},
                        same_namespace={"host": HOST, "pid": os.getpid(),
                                        "pid_namespace": os.readlink("/proc/self/ns/pid")})
    assert series == {("0", "old", "0"), ("0", "same_namespace", "0"), ("1", "", "")}


def test_a_mig_instance_names_the_run_on_it(tmp_path: Path) -> None:
    instances = [FakeGpu(uuid="MIG-aaaa", utilization=None), FakeGpu(uuid=f"MIG-{UUID}", utilization=None)]
    series = gpu_series(tmp_path, [FakeGpu(uuid="GPU-parent", mig=instances)],
                        on_mig={"host": "pod", "pid": 7, "gpu_uuids": [f"MIG-{UUID}"]})
    assert series == {("0", "", ""), ("0/0", "", ""), ("0/1", "on_mig", "0")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and NVML (no GPU was lent to this task)")
def test_on_a_real_gpu_the_metadatas_uuid_is_nvmls(isolated_home: Path) -> None:
    """The UUID the probe writes (torch's spelling) names the device NVML lists this process on."""
    import pynvml  # nvidia-ml-py, in the agent extra

    import gradwatch

    model = torch.nn.Linear(8, 1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.attach(model, opt, run="uuid", flush_interval=0.01) as probe:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8, device="cuda")).sum().backward()
            opt.step()
        probe.wait_ready()
    meta = json.loads((isolated_home / "runs" / "uuid" / "rank-0.meta.json").read_text())
    collector = GpuCollector(pynvml)
    collector.refresh()
    mine = [g for g in collector.sample() if os.getpid() in g.pids]
    assert mine and any(same_gpu(u, mine[0].uuid) for u in meta["gpu_uuids"]), (meta["gpu_uuids"], mine)
