"""The probe's background thread: turns captures into records, encodes them, appends them to the spool,
and polls the agent's commands.

Everything slow or fallible happens here, never on the training thread. Failures are counted as
dropped records and reported once; the thread never dies from them.

It holds the GIL in slices of ``_SLICE`` records and yields between them. How often it drains while
the run is stepping (``_BUSY_TICK_SECONDS``) trades the median step against the tail: draining every
50 ms costs the training thread one burst of ~50 ms worth of records (p99 step 1.9x the bare loop's
on a 0.7 ms MLP step), 10 ms ticks of 4-record slices 1.6x, but +30 % on the median overhead
(docs/benchmarks.md, issue 15). The median wins for now; the cure for the tail is less work per record.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradwatch.probes import graph_capture
from gradwatch.probes.captures import Capture, LogCapture, StepCapture, to_record
from gradwatch.probes.control import Command
from gradwatch.probes.devices import fullest_memory, gpu_uuids
from gradwatch.probes.identity import ProcessIdentity
from gradwatch.probes.nonfinite import CHECK_EVERY_STEPS, GradientParts, gradient_origin
from gradwatch.probes.resume import ResumePoint
from gradwatch.probes.spike_sample import SpikeSampler
from gradwatch.probes.spool_session import SpoolSession
from gradwatch.probes.warn_once import WarnOnce
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.proc import pid_namespace, process_start_ticks
from gradwatch.spool.records import (
    EndRecord,
    EndStatus,
    LogRecord,
    Record,
    ResumeRecord,
    RunMeta,
    StepRecord,
    encode,
)

# Once the run has a control directory (the agent acts on it), latency matters more than wake-ups: poll
# for commands every 10 ms and flush records every 20 ms (benchmarks/rule_latency.py).
_CONTROL_POLL_SECONDS = 0.01
_BUSY_TICK_SECONDS = 0.05
_FINAL_DEVICE_WAIT_SECONDS = 5.0
_CUDA_MEMORY_EVERY_SECONDS = 1.0
_SLICE = 16  # records encoded between two yields of the GIL


class SpoolWriterThread(threading.Thread):
    def __init__(
        self,
        *,
        queue: deque[Capture],
        layout: SpoolLayout,
        run_name: str,
        identity: ProcessIdentity,
        labels: dict[str, str],
        queue_dropped: Callable[[], int],
        warn: WarnOnce,
        flush_interval: float,
        on_agent_needed: Callable[[SpoolLayout], object] | None,
        inbox: deque[Command] | None = None,
        run_settings: dict[str, Any] | None = None,
        cuda_devices: list[int] | None = None,
        param_names: Callable[[], list[str]] = list,
        on_nonfinite: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(name="gradwatch-writer", daemon=True)
        self._queue = queue
        self._labels = labels
        self._queue_dropped = queue_dropped
        self._warn = warn
        self._interval = flush_interval
        self._inbox = inbox
        self._run_settings = run_settings or {}
        self._identity = identity
        self._cuda_devices = cuda_devices or []  # the parameters' devices; the first is the thread's
        self._cuda_device = self._cuda_devices[0] if self._cuda_devices else None
        self._param_names = param_names  # the meter's parameters' names, to name non-finite gradients
        self._on_nonfinite = on_nonfinite  # arms the forward check of a coming step (nonfinite.py)
        self._nonfinite_seen = (-2, -CHECK_EVERY_STEPS)  # (last non-finite step, last one whose gradients were named)
        self._spikes = SpikeSampler(param_names)  # the agent's spike statistic, for the on-trigger layer sample
        self._next_cuda_sample = 0.0
        self._stop_event = threading.Event()
        self._end: tuple[EndStatus, str | None, int, int | None] = (EndStatus.FINISHED, None, 0, None)
        self._seq = 0
        self._held: Capture | None = None  # a step waiting one drain for the scalars logged after it
        self._busy = False  # the last drain found records: the run is stepping, drain again soon
        self.session = SpoolSession(layout, run_name, identity, self._meta, warn, on_agent_needed,
                                    read_commands=inbox is not None)
        self.ready = threading.Event()  # set once the run directory and metadata exist
        self.open_requested = threading.Event()  # open before the first record (wait_ready)
        self._resume: ResumeRecord | None = None  # the first record of a resumed process, until written
        self.encode_dropped = 0  # records lost to encoding errors or device values that never arrived
        self.values_dropped = 0  # logged values that could not be read (each left out of its record alone)

    @property
    def run_name(self) -> str | None:
        return self.session.run_name

    @property
    def run_dir(self) -> Path | None:
        return self.session.run_dir

    # -- control, called from the training thread -------------------------------------------
    def stop(self, *, status: EndStatus, error: str | None, final_step: int, timeout: float,
             exit_code: int | None = None) -> None:
        self._end = (status, error, final_step, exit_code)
        self._stop_event.set()
        self.join(timeout)

    def dropped(self) -> int:
        return self._queue_dropped() + self.encode_dropped + self.session.lines_dropped

    def resume_at(self, point: ResumePoint) -> None:
        """Continue the run ``point.run`` (before the spool was opened): its directory, then a resume record first."""
        self.session.requested_run = point.run
        self.session.resuming = True
        self._resume = ResumeRecord(step=point.step, t=time.time(), checkpoint=point.checkpoint)

    @property
    def opened(self) -> bool:
        return self.session.run_dir is not None

    # -- the thread ---------------------------------------------------------------------------
    def run(self) -> None:
        self._use_probe_device()
        # the run directory is created with the first record (or when asked): until then load_state_dict() may
        # still name the run this process resumes
        acting = False  # the agent acts on this run: read its commands often
        next_poll = 0.0
        while True:
            idle_wait = min(self._interval, _CONTROL_POLL_SECONDS) if acting else self._interval
            stopping = self._stop_event.wait(min(idle_wait, _BUSY_TICK_SECONDS) if self._busy else idle_wait)
            commands = self.session.commands
            if commands is not None and self._inbox is not None and not stopping and time.monotonic() >= next_poll:
                # the agent creates control/ for runs it acts on; it never goes away, so check until it exists
                acting = acting or commands.path.parent.is_dir()
                self._guarded(self._poll_commands)
                next_poll = time.monotonic() + idle_wait
            if self.open_requested.is_set() and not self.ready.is_set():
                self._guarded(self._open)
            self._busy = False
            self._guarded(self._drain, final=stopping)
            if stopping:
                break
        self._guarded(self._write_end)
        self.session.close()

    def _open(self) -> None:
        if self._resume is not None:
            self._write([])  # the resume record is the first line, whatever comes next
        elif self.session.open():
            self.ready.set()

    def _guarded(self, fn: Callable[..., object], **kwargs: Any) -> None:
        try:
            fn(**kwargs)
        except Exception as exc:  # a bug of ours must not stop the thread
            self._warn(f"writer-{type(exc).__name__}", "internal error in the spool writer (%r); records may be dropped", exc)

    def _poll_commands(self) -> None:
        assert self.session.commands is not None and self._inbox is not None
        self._inbox.extend(self.session.commands.poll())

    def _drain(self, final: bool = False) -> None:
        # at the end, device copies still in flight get _FINAL_DEVICE_WAIT_SECONDS in all, not per slice
        deadline = time.monotonic() + _FINAL_DEVICE_WAIT_SECONDS
        while self._drain_slice(final, deadline):
            time.sleep(0)  # offer the GIL between slices (measured: it shortens no wait; the slices bound it)

    def _drain_slice(self, final: bool, deadline: float) -> bool:
        """Encode and append up to _SLICE records; True when more are waiting."""
        records: list[Record] = []
        queue = self._queue
        while queue and len(records) < _SLICE:
            item = queue[0]
            follower = queue[1] if len(queue) > 1 else None
            # The scalars logged right after a step go into that step's record: one line per step. A step
            # with nothing behind it yet waits for them until the next drain.
            own_step = item.__class__ is StepCapture and not item.opt  # another optimizer's carries its values
            if own_step and follower is None and not final and self._held is not item:
                self._held = item  # until the next drain
                break
            merge = own_step and follower.__class__ is LogCapture and follower.step == item.step  # type: ignore[union-attr]
            unreadable: list[tuple[str, str]] = []
            try:
                record = to_record(item, follower if merge else None, unreadable)  # type: ignore[arg-type]
                if record is not None and unreadable:
                    self._values_unreadable(unreadable)
                if self.values_dropped and (record.__class__ is StepRecord or record.__class__ is LogRecord):
                    record.values_dropped = self.values_dropped  # as of this record
            except Exception as exc:
                self._warn("encode", "could not encode a record (%s); it was dropped", exc)
                self.encode_dropped += 1
                queue.popleft()
                continue
            if record is None:  # a device value is still being copied
                if final and time.monotonic() < deadline:
                    time.sleep(0.001)
                    continue
                if final:
                    self.encode_dropped += len(queue)
                    queue.clear()
                break
            queue.popleft()
            if merge:
                queue.popleft()
            records.append(record)
            if record.__class__ is StepRecord and not record.opt:
                norm = record.grad_norm
                if norm is not None and not math.isfinite(norm):
                    self._nonfinite(record, item, records)  # type: ignore[arg-type]
                self._spike_sample(record, item, records)  # type: ignore[arg-type]
            elif record.__class__ is LogRecord:
                self._spikes.spiked(record)
        if records:
            self._busy = True
            self._add_cuda_memory(records)
            self._write(records)
        return bool(records) and len(records) == _SLICE and bool(queue)

    def _nonfinite(self, record: StepRecord, item: StepCapture, records: list[Record]) -> None:
        """A step whose gradient norm is non-finite: name its non-finite gradients (the first step of a non-finite
        stretch, then once per CHECK_EVERY_STEPS of it), and ask for a forward check."""
        step, (last_bad, named_at) = record.step, self._nonfinite_seen
        self._nonfinite_seen = (step, named_at)
        if step == last_bad + 1 and step - named_at < CHECK_EVERY_STEPS:
            return
        self._nonfinite_seen = (step, step)
        try:
            if item.parts is not None:  # None: the script's clip gave the norm, the gradients are all NaN by now
                norms, owners = item.parts
                origin = gradient_origin(record.step, record.t, GradientParts(norms, owners, self._param_names))
                if origin is not None:
                    records.append(origin)
        except Exception as exc:  # a diagnosis of ours must never cost the records
            self._warn("nonfinite-origin", "could not name the non-finite gradients (%r)", exc)
        if self._on_nonfinite is not None:
            self._on_nonfinite(record.step)

    def _spike_sample(self, record: StepRecord, item: StepCapture, records: list[Record]) -> None:
        try:
            quantity = self._spikes.spiked(record)
            if quantity:
                sample = self._spikes.sample(record, quantity, item.parts)
                if sample is not None:
                    records.append(sample)
        except Exception as exc:  # a diagnosis of ours must never cost the records
            self._warn("spike-sample", "could not sample the layers of a spiking step (%r)", exc)

    def _values_unreadable(self, unreadable: list[tuple[str, str]]) -> None:
        self.values_dropped += len(unreadable)
        for name, why in unreadable:
            self._warn(f"unreadable-{name[:60]}", "the value logged as %r could not be read (%s); it is left out of "
                       "its step's record (the step's other values are recorded), here and each time it happens",
                       name, why)

    def _use_probe_device(self) -> None:
        """The current CUDA device is per thread and starts at 0: without this, the thread's first CUDA call (an
        event query) would create a context on GPU 0 in every rank (hundreds of MiB each, and NVML then lists
        every rank on GPU 0), whatever the script's ``set_device``. DataLoader's pin-memory thread sets its
        device first for the same reason."""
        if self._cuda_device is None:
            return
        try:
            import torch

            torch.cuda.set_device(self._cuda_device)
        except Exception as exc:  # never the training's problem: the values are still read, on the default device
            self._warn("writer-cuda-device", "could not select CUDA device %s in gradwatch's writer thread (%r)",
                       self._cuda_device, exc)

    def _add_cuda_memory(self, records: list[Record]) -> None:
        """The CUDA allocator's counters of the fullest of the process's devices, once a second, on the newest step
        record. Read here, not on the training thread: they are host-side counters (no synchronisation), but
        building them costs."""
        if self._cuda_device is None or time.monotonic() < self._next_cuda_sample or graph_capture.active():
            return
        step = next((r for r in reversed(records) if isinstance(r, StepRecord)), None)
        if step is None:
            return
        self._next_cuda_sample = time.monotonic() + _CUDA_MEMORY_EVERY_SECONDS
        step.cuda_mem = fullest_memory(self._cuda_devices)

    def _write(self, records: list[Record]) -> None:
        if self._resume is not None:  # a resumed process's first line
            records, self._resume = [self._resume, *records], None
        lines = []
        for record in records:
            self._seq += 1
            record.seq = self._seq
            record.dropped = self.dropped()
            try:
                lines.append(encode(record))
            except (TypeError, ValueError) as exc:
                self._warn("encode", "could not encode a record (%s); it was dropped", exc)
                self.encode_dropped += 1
        self.session.append(lines)
        if not self.ready.is_set() and self.session.run_dir is not None:
            self.ready.set()

    def _meta(self, run_name: str) -> RunMeta:
        import torch

        from gradwatch import __version__

        ident = self._identity
        return RunMeta(
            run=run_name, rank=ident.rank, world_size=ident.world_size, requested_run=self.session.requested_run,
            labels=self._labels, host=ident.host, pid=ident.pid, proc_start_ticks=process_start_ticks(),
            local_rank=ident.local_rank, start_time=ident.start_time, launch_key=ident.launch_key,
            argv=list(sys.argv), python=sys.version.split()[0], torch=torch.__version__, gradwatch=__version__,
            worker=ident.worker, gpu_uuids=gpu_uuids(self._cuda_devices) if self._cuda_devices else [],
            pid_namespace=pid_namespace(), **self._run_settings)

    def _write_end(self) -> None:
        status, error, final_step, exit_code = self._end
        self._write([EndRecord(step=final_step, t=time.time(), status=status, error=error, exit_code=exit_code)])
