"""The writer thread selects the probe's CUDA device before any CUDA call (issue 17): the current device is per
thread and starts at 0, so without it every rank under torchrun put a context on GPU 0. No GPU here: the probe
is told its parameters live on cuda:1 and ``torch.cuda``'s calls are recorded by a stand-in (the test says so)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.probes import probe as probe_module
from tests.probe.helpers import tiny_model, train_steps
from tests.spool_records import run_records


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

    monkeypatch.setattr(probe_module, "_cuda_devices", lambda optimizer: [1])  # "the parameters are on cuda:1"
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


def test_several_devices_the_fullest_is_sampled_and_every_uuid_is_in_the_metadata(
        isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model on cuda:0 and cuda:1: the memory recorded is the device nearest to its limit (the one an OOM alert
    is about), and the metadata lists both GPUs' UUIDs, which the agent matches to NVML's. Stand-ins for
    ``torch.cuda`` (no GPU here)."""
    reserved = {0: 10 * 2**30, 1: 70 * 2**30}

    class Properties:
        def __init__(self, index: int) -> None:
            self.total_memory = 80 * 2**30
            self.uuid = f"5e3a1b7c-0000-0000-0000-00000000000{index}"

    monkeypatch.setattr(probe_module, "_cuda_devices", lambda optimizer: [0, 1])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: {"reserved_bytes.all.current": reserved[device],
                                                                     "allocated_bytes.all.current": device + 1})
    monkeypatch.setattr(torch.cuda, "get_device_properties", Properties)
    model, opt = tiny_model()
    with gradwatch.attach(model, opt, run="devices", flush_interval=0.01) as probe:
        train_steps(model, opt, probe, steps=3)
    meta = json.loads((isolated_home / "runs" / "devices" / "rank-0.meta.json").read_text())
    assert meta["gpu_uuids"] == ["5e3a1b7c-0000-0000-0000-000000000000", "5e3a1b7c-0000-0000-0000-000000000001"]
    assert meta["pid_namespace"] == os.readlink("/proc/self/ns/pid")
    memory = [r["cuda_mem"] for r in run_records(isolated_home, "devices", 0) if "cuda_mem" in r]
    assert memory and memory[0]["device"] == 1 and memory[0]["reserved"] == 70 * 2**30 and memory[0]["allocated"] == 2


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


def test_a_device_value_is_awaited_on_its_own_devices_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The event a pending copy is awaited by is recorded on the current stream of the tensor's device, where
    the copy runs, not on the current device's. No GPU here: the CUDA calls are recorded by stand-ins."""
    from gradwatch.probes import readback

    recorded: list[Any] = []

    class Event:
        def record(self, stream: Any = None) -> None:
            recorded.append(stream)

        def query(self) -> bool:
            return True

    monkeypatch.setattr(readback, "pinned", lambda shape, dtype: torch.empty(shape, dtype=dtype))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", str(device)))
    value = readback.PendingDeviceValue(torch.tensor(2.5))
    vector = readback.PendingDeviceVector(torch.tensor([1.0, 2.0]))
    assert recorded == [("stream of", "cpu"), ("stream of", "cpu")]  # the tensor's device, asked explicitly
    assert value.resolve() == 2.5 and vector.resolve() == [1.0, 2.0]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices; this machine has "
                    f"{torch.cuda.device_count()} (no GPU was lent to this task)")
def test_a_value_on_another_device_than_the_current_one_is_read_right() -> None:
    """The DDP tutorial pattern: tensors moved with .to(1) while the current device is 0. A long kernel queued
    before the value on cuda:1: the value read must be the one computed, never the pinned buffer's old bytes."""
    from gradwatch.probes import readback

    torch.cuda.set_device(0)
    a = torch.randn(4096, 4096, device="cuda:1")
    for _ in range(20):
        a = a @ a / 64.0  # keeps cuda:1 busy
    value = torch.nan_to_num(a.sum()) * 0 + 7.25
    pending = readback.PendingDeviceValue(value)
    while (got := pending.resolve()) is readback.NOT_READY:
        pass
    assert got == 7.25


def test_a_reused_clip_norm_still_tells_the_guards_the_gradients_span_devices() -> None:
    """The script's clip_grad_norm_ result is reused as the step's norm; the meter used to return it before looking
    at the gradients, so the guards took gradients on several devices for one fused batch and multiplied them by one
    device's coefficient: some scaled, then an error. Here the second "device" is ``meta`` (no GPU here)."""
    from gradwatch.probes.gradnorm import GradNormMeter

    on_cpu, elsewhere = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, device="meta"))
    on_cpu.grad, elsewhere.grad = torch.ones(3), torch.ones(3, device="meta")
    meter = GradNormMeter(torch.optim.SGD([on_cpu, elsewhere], lr=0.1))
    reused = torch.tensor(2.0)
    assert meter((reused, 2)) is reused
    assert not meter.fusable


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices; this machine has "
                    f"{torch.cuda.device_count()} (no GPU was lent to this task)")
def test_a_model_on_two_gpus_is_clipped_whole_with_the_scripts_clip_reused(isolated_home: Path) -> None:
    """Pipeline-style placement: layer 0 on cuda:0, layer 1 on cuda:1; the script clips at 1e6 (nothing to do) and
    the probe's fixed guard at 0.01: every gradient scaled by the same coefficient, on its own device."""
    first, second = torch.nn.Linear(8, 8).to("cuda:0"), torch.nn.Linear(8, 1).to("cuda:1")
    params = [*first.parameters(), *second.parameters()]
    opt = torch.optim.SGD(params, lr=0.0)
    rules = {"guards": {"clip": {"scheme": "fixed", "max_norm": 0.01}}}
    with gradwatch.attach(torch.nn.ModuleList([first, second]), opt, run="two-gpus", rules=rules):
        x = torch.randn(4, 8, device="cuda:0")
        second(first(x).to("cuda:1")).pow(2).sum().backward()
        before = [p.grad.clone() for p in params]
        total = torch.nn.utils.clip_grad_norm_(params, 1e6)
        opt.step()
        after = [p.grad for p in params]
    coef = 0.01 / (float(total) + 1e-6)
    for b, a in zip(before, after, strict=True):
        assert torch.allclose(a, b * coef, rtol=1e-4)


def test_a_steps_device_scalars_travel_in_one_copy_with_one_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """The norm, the guard's flags and the loss scale of a step: one float64 vector per device, copied into a row
    of a pinned ring reused round robin, one event. Stand-ins for the CUDA calls (no GPU here)."""
    from gradwatch.probes import readback

    events: list[Any] = []

    class Event:
        done = False

        def __init__(self) -> None:
            events.append(self)

        def record(self, stream: Any = None) -> None:
            pass

        def query(self) -> bool:
            return self.done

    monkeypatch.setattr(readback, "pinned", lambda shape, dtype: torch.zeros(shape, dtype=dtype))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(readback, "_ring", readback._PinnedRing())
    batch = readback.Batch()
    norm = batch.add_device(torch.tensor(0.75, dtype=torch.float32))
    clipped = batch.add_device(torch.tensor(True))
    scale = batch.add_device(torch.tensor(65536.0, dtype=torch.float64))
    batch.send()
    assert len(events) == 1
    assert norm.resolve() is readback.NOT_READY  # until the event says the copy landed
    events[0].done = True
    assert (norm.resolve(), clipped.resolve(), scale.resolve()) == (0.75, 1.0, 65536.0)

    rows = []
    for i in range(3):  # the rows come round: each batch one, freed once read
        later = readback.Batch()
        value = later.add_device(torch.tensor(float(i)))
        later.send()
        events[-1].done = True
        rows.append(value.landing.row)  # type: ignore[union-attr]
        assert value.resolve() == float(i)
    assert rows == [1, 2, 3]
    unread = readback.Batch()
    held = unread.add_device(torch.tensor(9.0))
    unread.send()  # row 4, not read yet: when the ring comes round to it, a fresh buffer is taken instead
    assert held.landing.row == 4  # type: ignore[union-attr]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU was lent to this task)")
def test_on_a_gpu_a_guarded_step_and_its_log_call_record_two_events(isolated_home: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []
    original = torch.cuda.Event

    class Counting(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    model = torch.nn.Linear(64, 1).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    rules = {"guards": {"clip": {"scheme": "fixed", "max_norm": 1.0}}}
    with gradwatch.attach(model, opt, run="events", rules=rules, layer_stats_every=0) as probe:
        monkeypatch.setattr(torch.cuda, "Event", Counting)
        for _ in range(10):
            loss = model(torch.randn(8, 64, device="cuda")).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss, accuracy=loss * 0)
        torch.cuda.synchronize()
        assert len(made) == 20  # one per step (norm, clipped, skip flag), one per log call (two values)
    steps = [r for r in run_records(isolated_home, "events", 0) if r["kind"] == "step"]
    assert len(steps) == 10 and all(r["clip"] == 1.0 and r["values"]["accuracy"] == 0.0 for r in steps)
