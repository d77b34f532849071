"""The probe's background thread: resolves captured values, encodes records, appends them to the spool.

Everything slow or fallible happens here, never on the training thread. Failures are
counted as dropped records and reported once; the thread never dies from them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradwatch.probes import readback
from gradwatch.probes.control import Command, CommandReader, acked_ids
from gradwatch.probes.identity import ProcessIdentity
from gradwatch.probes.layerstats import layer_record
from gradwatch.spool.format import FORMAT_NAME, FORMAT_VERSION, RecordKind, SpoolLayout
from gradwatch.spool.proc import process_alive, process_start_ticks
from gradwatch.spool.writer import RecordFileWriter, claim_run_dir, write_json_atomic

log = logging.getLogger("gradwatch")

#: Items the training thread puts on the queue; tuples are cheaper than objects to build.
#: ("step", step, t, duration, data_wait, grad_norm, lrs, guard), ("log", step, t, {name: value})
#: ("ack", step, t, command, status, detail) and ("layers", ...) (probes/layerstats.py)
QueueItem = tuple[Any, ...]
# Once the run has a control directory (the agent acts on it), latency matters more than wake-ups: poll
# for commands every 10 ms and flush records every 20 ms (benchmarks/rule_latency.py).
_CONTROL_POLL_SECONDS = 0.01
_ACTING_FLUSH_SECONDS = 0.02

_RETRY_OPEN_SECONDS = 5.0
# One encoder for every line: json.dumps() with non-default arguments builds a new one per call.
# NaN/Infinity are written as the JSON extensions NaN/Infinity (docs/spool-format.md).
_encode_json = json.JSONEncoder(separators=(",", ":")).encode
_FINAL_DEVICE_WAIT_SECONDS = 5.0
_CUDA_MEMORY_EVERY_SECONDS = 1.0


def _resolve_values(values: dict[str, Any]) -> dict[str, Any] | None:
    resolved = {name: readback.resolve(v) for name, v in values.items()}
    return None if readback.NOT_READY in resolved.values() else resolved


def _guard_fields(guard: tuple[Any, Any, Any, Any]) -> dict[str, Any] | None:
    """The step record's guard fields, or None while a device value is in flight."""
    threshold, clipped, skip, observed = (readback.resolve(v) for v in guard)
    if readback.NOT_READY in (threshold, clipped, skip, observed):
        return None
    fields: dict[str, Any] = {}
    if threshold is not None:
        fields["clip"] = threshold
        fields["clipped"] = bool(clipped)
    if isinstance(skip, float):  # the device path hands over found_inf as 0.0/1.0
        skip = "nonfinite" if skip else None
    if isinstance(observed, float):
        observed = "nonfinite" if observed else None
    if skip:
        fields["skip"] = skip
    if observed:
        fields["would_skip"] = observed
    return fields


class WarnOnce:
    """Log each distinct problem once per probe; later occurrences are only counted."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, message: str, *args: object) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.warning("gradwatch: " + message, *args)


class SpoolWriterThread(threading.Thread):
    def __init__(
        self,
        *,
        queue: deque[QueueItem],
        layout: SpoolLayout,
        run_name: str,
        identity: ProcessIdentity,
        labels: dict[str, str],
        queue_dropped: Callable[[], int],
        warn: WarnOnce,
        flush_interval: float,
        on_agent_needed: Callable[[SpoolLayout], object] | None,
        inbox: deque[Command] | None = None,
        extra_meta: dict[str, Any] | None = None,
        cuda_device: int | None = None,
    ) -> None:
        super().__init__(name="gradwatch-writer", daemon=True)
        self._queue = queue
        self._layout = layout
        self._requested_name = run_name
        self._identity = identity
        self._labels = labels
        self._queue_dropped = queue_dropped
        self._warn = warn
        self._interval = flush_interval
        self._on_agent_needed = on_agent_needed
        self._inbox = inbox
        self._extra_meta = extra_meta or {}
        self._commands: CommandReader | None = None
        self._cuda_device = cuda_device
        self._next_cuda_sample = 0.0
        self._stop_event = threading.Event()
        self._end_status: tuple[str, str | None, int] = ("finished", None, 0)
        self._file: RecordFileWriter | None = None
        self._next_open_attempt = 0.0
        self._seq = 0
        self.run_name: str | None = None
        self.run_dir: Path | None = None
        self.ready = threading.Event()  # set once the run directory and metadata exist
        self.write_dropped = 0  # records lost to I/O or encoding errors

    # -- control, called from the training thread -------------------------------------------
    def stop(self, *, status: str, error: str | None, final_step: int, timeout: float) -> None:
        self._end_status = (status, error, final_step)
        self._stop_event.set()
        self.join(timeout)

    def dropped(self) -> int:
        return self._queue_dropped() + self.write_dropped

    # -- the thread ---------------------------------------------------------------------------
    def run(self) -> None:
        self._guarded(self._open)  # create the run directory (and start an agent) before the first record
        next_flush = time.monotonic() + self._interval
        fast = False
        while True:
            # the agent creates control/ for runs it acts on; it never goes away, so check until it exists
            fast = fast or (self._commands is not None and self._commands.path.parent.is_dir())
            stopping = self._stop_event.wait(min(self._interval, _CONTROL_POLL_SECONDS) if fast else self._interval)
            if self._commands is not None and self._inbox is not None and not stopping:
                self._guarded(self._poll_commands)
            if stopping or time.monotonic() >= next_flush or not fast:
                self._guarded(self._drain, final=stopping)
                next_flush = time.monotonic() + (min(self._interval, _ACTING_FLUSH_SECONDS) if fast else self._interval)
            if stopping:
                break
        self._guarded(self._write_end)
        if self._file is not None:
            self._file.close()

    def _guarded(self, fn: Callable[..., object], **kwargs: Any) -> None:
        try:
            fn(**kwargs)
        except Exception as exc:  # a bug of ours must not stop the thread
            self._warn(f"writer-{type(exc).__name__}", "internal error in the spool writer (%r); records may be dropped", exc)

    def _poll_commands(self) -> None:
        assert self._commands is not None and self._inbox is not None
        self._inbox.extend(self._commands.poll())

    def _drain(self, final: bool = False) -> None:
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + _FINAL_DEVICE_WAIT_SECONDS
        queue = self._queue
        while queue:
            item = queue[0]
            # The scalars logged right after a step go into that step's record: one line per step.
            follower = queue[1] if len(queue) > 1 and item[0] == "step" else None
            merge = follower is not None and follower[0] == "log" and follower[1] == item[1]
            try:
                record = self._record(item, follower if merge else None)
            except Exception as exc:
                self._warn("encode", "could not encode a record (%s); it was dropped", exc)
                self.write_dropped += 1
                queue.popleft()
                continue
            if record is None:  # a device value is still being copied
                if final and time.monotonic() < deadline:
                    time.sleep(0.001)
                    continue
                if final:
                    self.write_dropped += len(queue)
                    queue.clear()
                break
            queue.popleft()
            if merge:
                queue.popleft()
            records.append(record)
        if records:
            self._add_cuda_memory(records)
            self._write([self._line(record) for record in records])

    def _add_cuda_memory(self, records: list[dict[str, Any]]) -> None:
        """The CUDA allocator's counters, once a second, on the newest step record. Read here, not on
        the training thread: they are host-side counters (no synchronisation), but building them costs."""
        if self._cuda_device is None or time.monotonic() < self._next_cuda_sample:
            return
        step = next((r for r in reversed(records) if r["kind"] == "step"), None)
        if step is None:
            return
        self._next_cuda_sample = time.monotonic() + _CUDA_MEMORY_EVERY_SECONDS
        import torch

        stats = torch.cuda.memory_stats(self._cuda_device)
        step["cuda_mem"] = {"allocated": stats.get("allocated_bytes.all.current", 0),
                            "reserved": stats.get("reserved_bytes.all.current", 0),
                            "peak": stats.get("allocated_bytes.all.peak", 0),
                            "total": torch.cuda.get_device_properties(self._cuda_device).total_memory}

    @staticmethod
    def _record(item: QueueItem, log_item: QueueItem | None = None) -> dict[str, Any] | None:
        """The record for a queue item (plus the log item merged into it), or None while a device
        value is still in flight."""
        if item[0] == "step":
            _, step, t, duration, wait, norm, lrs, guard = item
            norm = readback.resolve(norm)
            lrs = [readback.resolve(lr) for lr in lrs]
            if norm is readback.NOT_READY or readback.NOT_READY in lrs:
                return None
            record = {"kind": "step", "step": step, "t": t, "grad_norm": norm, "lr": lrs, "dur": duration,
                      "wait": wait}
            if guard is not None:
                fields = _guard_fields(guard)
                if fields is None:
                    return None
                record.update(fields)
            if log_item is not None:
                values = _resolve_values(log_item[3])
                if values is None:
                    return None
                record["values"] = values
            return record
        if item[0] == "layers":
            return layer_record(item)
        if item[0] == "ack":
            _, step, t, command, status, detail = item
            return {"kind": "ack", "step": step, "t": t, "id": command.id, "action": command.type,
                    "rule": command.rule, "reason": command.reason, "apply_at_step": command.apply_at_step,
                    "status": status, "detail": detail}
        _, step, t, values = item
        resolved = _resolve_values(values)
        return None if resolved is None else {"kind": "log", "step": step, "t": t, "values": resolved}

    def _line(self, record: dict[str, Any]) -> bytes:
        self._seq += 1
        record["seq"] = self._seq
        dropped = self.dropped()
        if dropped:  # cumulative; absent means none so far
            record["dropped"] = dropped
        return (_encode_json(record) + "\n").encode()

    def _write(self, lines: list[bytes]) -> None:
        if not self._open():
            self.write_dropped += len(lines)
            return
        assert self._file is not None
        try:
            self._file.append(b"".join(lines))
        except OSError as exc:
            self.write_dropped += len(lines)
            self._warn("write", "cannot write to the spool %s (%s); training goes on, records are dropped and counted",
                       self._file.path, exc)
            self._file.close()
            self._file = None
            self._next_open_attempt = time.monotonic() + _RETRY_OPEN_SECONDS

    def _open(self) -> bool:
        if self._file is not None:
            return True
        if time.monotonic() < self._next_open_attempt:
            return False
        try:
            if self.run_dir is None:
                name, run_dir = claim_run_dir(self._layout, self._requested_name, self._identity.launch_key)
                meta_file = SpoolLayout.meta_file(run_dir, self._identity.rank)
                self._check_rank_unclaimed(meta_file)
                write_json_atomic(meta_file, self._meta(name))
                self.run_name, self.run_dir = name, run_dir
                if self._inbox is not None:
                    records_file = SpoolLayout.records_file(run_dir, self._identity.rank)
                    self._commands = CommandReader(run_dir, acked_ids(records_file))
                self.ready.set()
                self._start_agent_if_needed()
            self._file = RecordFileWriter(SpoolLayout.records_file(self.run_dir, self._identity.rank))
            return True
        except OSError as exc:
            self._warn("open", "cannot create the run spool under %s (%s); training goes on, records are dropped and "
                       "counted; set GRADWATCH_HOME to a writable directory", self._layout.runs_dir, exc)
            self._next_open_attempt = time.monotonic() + _RETRY_OPEN_SECONDS
            return False

    def _check_rank_unclaimed(self, meta_file: Path) -> None:
        """Two live processes of one launch with the same rank: attach ran before the rank was known."""
        try:
            other = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return
        pid = other.get("pid") if isinstance(other, dict) else None
        if isinstance(pid, int) and pid != self._identity.pid and other.get("host") == self._identity.host \
                and process_alive(pid) is not False:
            self._warn("rank-clash", "process %d also claims rank %d of run %s; their records will be mixed. Call "
                       "gradwatch.attach() after torch.distributed.init_process_group(), or pass rank= and "
                       "world_size=", pid, self._identity.rank, meta_file.parent.name)

    def _start_agent_if_needed(self) -> None:
        if self._on_agent_needed is None:
            return
        try:
            self._on_agent_needed(self._layout)
        except Exception as exc:
            self._warn("autostart", "could not start a gradwatch agent (%s); run `gradwatch agent` yourself", exc)

    def _meta(self, run_name: str) -> dict[str, Any]:
        import torch

        from gradwatch import __version__

        ident = self._identity
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "run": run_name,
            "requested_run": self._requested_name,
            "labels": self._labels,
            "host": ident.host,
            "pid": ident.pid,
            "proc_start_ticks": process_start_ticks(),
            "rank": ident.rank,
            "local_rank": ident.local_rank,
            "world_size": ident.world_size,
            "start_time": ident.start_time,
            "launch_key": ident.launch_key,
            "argv": list(sys.argv),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "gradwatch": __version__,
            **self._extra_meta,
        }

    def _write_end(self) -> None:
        status, error, final_step = self._end_status
        self._write([self._line({"kind": RecordKind.END.value, "step": final_step, "t": time.time(),
                                 "status": status, "error": error})])
