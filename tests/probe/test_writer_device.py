"""The writer thread selects the probe's CUDA device before any CUDA call (issue 17): the current device is per
thread and starts at 0, so without it every rank under torchrun put a context on GPU 0. No GPU here: the probe
is told its parameters live on cuda:1 and ``torch.cuda``'s calls are recorded by a stand-in (the test says so)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.probes import probe as probe_module
from tests.probe.helpers import tiny_model, train_steps


def test_the_writer_thread_selects_the_probe_device_before_any_cuda_call(isolated_home: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, Any]] = []  # (thread, call, device)

    def recorder(name: str, result: Any = None) -> Any:
        def call(device: Any = None, *args: Any, **kwargs: Any) -> Any:
            calls.append((threading.current_thread().name, name, device))
            return result
        return call

    class Properties:
        total_memory = 80 * 2**30

    monkeypatch.setattr(probe_module, "_cuda_device", lambda optimizer: 1)  # "the parameters are on cuda:1"
    monkeypatch.setattr(torch.cuda, "set_device", recorder("set_device"))
    monkeypatch.setattr(torch.cuda, "memory_stats", recorder("memory_stats", {"allocated_bytes.all.current": 1}))
    monkeypatch.setattr(torch.cuda, "get_device_properties", recorder("get_device_properties", Properties()))
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="device", flush_interval=0.01) as probe:
        train_steps(model, opt, probe, steps=3)
    writer = [(name, device) for thread, name, device in calls if thread == "gradwatch-writer"]
    assert writer, calls
    assert writer[0] == ("set_device", 1)  # first, before the allocator is read or an event queried
    assert all(device == 1 for _, device in writer)
    assert not [c for c in calls if c[0] != "gradwatch-writer" and c[1] == "set_device"]  # the script's own alone


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices; this machine has "
                    f"{torch.cuda.device_count()} (no GPU was lent to this task)")
def test_a_probe_on_cuda1_puts_no_context_on_gpu0(isolated_home: Path) -> None:
    """On a real machine: a process training on cuda:1 (set_device) has no memory on GPU 0 after the probe ran."""
    torch.cuda.set_device(1)
    model = torch.nn.Linear(64, 1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.attach(model, opt, run="gpu1", flush_interval=0.01) as probe:
        for _ in range(20):
            loss = model(torch.randn(8, 64, device="cuda")).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss)
    torch.cuda.synchronize()
    import os

    import pynvml  # nvidia-ml-py: which processes hold a context on GPU 0 (NVML indexes GPUs as CUDA does
    # when CUDA_DEVICE_ORDER=PCI_BUS_ID; run this with it set)

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert os.getpid() not in [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
