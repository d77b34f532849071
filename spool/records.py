"""The spool's records: one typed definition per kind, one encoder, one decoder.

This module is the contract between the probe (which encodes), the agent, the rules and the
tests (which decode); no other module spells a record's keys. docs/spool-format.md is its
user-facing description.

Decoding treats every line as untrusted (a crash mid-write, another user's process): the
fields every record needs must have the right type or the line is rejected with a reason;
optional fields are coerced (a number that is not one becomes ``None``, strings are bounded,
collections are capped), so one odd value never costs the rest of the record. Numbers may be
NaN or infinite on purpose (a diverging loss is what we are here to see): they are kept, and
the consumers flag them.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gradwatch.spool.format import FORMAT_NAME, FORMAT_VERSION

_fast_loads: Callable[[bytes | str], Any]
try:  # the agent's decoder (the gradwatch[agent] extra): 5x json's rate on the probe's lines
    from orjson import loads as _fast_loads
except ImportError:  # the probe needs neither: its command reader uses json
    _fast_loads = json.loads

MAX_TEXT = 1_000  # characters of a free-text field (reason, detail, error) kept
MAX_NAME = 200  # characters of a metric or layer name
MAX_VALUES = 256  # named scalars per record
MAX_LRS = 1_024  # param groups
MAX_OPTIMIZER_NAME = 40  # the optimizer label of a step record
MAX_LAYERS = 10_000  # layers of a layers record
MAX_UUID = 80  # characters of a GPU UUID or a pid namespace
MAX_GPUS = 64  # GPUs one process uses
MAX_ORIGIN_PARAMS = 64  # parameter names a nonfinite record lists
SPIKE_SAMPLE_GAP = 10  # (1.8) steps at least between two on-trigger layer samples: a spike stretch has its first's
MAX_UNIT_SHARES = 256  # (1.9) unit shares an activations record keeps per module
MAX_INT = 2**63 - 1  # steps, counters: what a signed 64-bit field holds


class RecordKind(str, enum.Enum):
    """The ``kind`` field of a record line."""

    STEP = "step"  # one optimizer step: grad norm, learning rates, timings
    LOG = "log"  # scalars passed to Probe.log() that could not join their step's record
    END = "end"  # the process closed its probe: status finished | stopped | failed
    ACK = "ack"  # the probe applied (or refused) a command of the agent (since 1.1)
    LAYERS = "layers"  # per-layer gradient norms and update/weight ratios of a sampled step (since 1.2)
    CHECKPOINT = "checkpoint"  # the script saved the probe's state (probe.state_dict()) after this step (1.5)
    RESUME = "resume"  # a new process continues the run from a saved state: the next step is step + 1 (1.5)
    NONFINITE = "nonfinite"  # where a non-finite gradient or forward output came from (1.7)
    ACTIVATIONS = "activations"  # per activation module: its units' activity and its input's spread (1.9)


class AckStatus(str, enum.Enum):
    """What became of a command on one rank."""

    APPLIED = "applied"
    LATE = "late"  # read after its apply_at_step; applied at once
    REJECTED = "rejected"  # refused; nothing changed
    NOT_TAKEN = "not_taken"  # (1.4) carried out, but its effect was not seen (an LR cut at min_lr); detail: why

    @property
    def carried_out(self) -> bool:
        """The action changed the run (counted as an action taken)."""
        return self is AckStatus.APPLIED or self is AckStatus.LATE


class EndStatus(str, enum.Enum):
    """How a process's probe ended."""

    FINISHED = "finished"
    STOPPED = "stopped"  # a rule stopped the run (1.1)
    FAILED = "failed"  # the script raised, or exited with a non-zero status (exit_code, 1.5)
    INTERRUPTED = "interrupted"  # Ctrl-C (KeyboardInterrupt) or SIGTERM (a scheduler's preemption) (1.5)


class RecordError(ValueError):
    """A line that is not a valid record; ``reason`` is a short, bounded label (for counters)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- the records ---------------------------------------------------------------------------------
@dataclass(slots=True)
class CudaMemory:
    """The process's CUDA caching allocator, in bytes."""

    allocated: float | None = None
    reserved: float | None = None
    peak: float | None = None  # peak allocated
    total: float | None = None  # the device's memory
    device: int | None = None  # (1.7) which CUDA device: of a process on several, the fullest


@dataclass(slots=True)
class StepRecord:
    """One optimizer step. ``values`` are the scalars logged right after it (``probe.log``)."""

    KIND: ClassVar[RecordKind] = RecordKind.STEP
    step: int
    t: float
    grad_norm: float | None = None
    lr: list[float] = field(default_factory=list)
    dur: float | None = None  # seconds from the end of the previous step to the end of this one
    wait: float | None = None  # seconds from the end of the previous step to the next forward pass
    values: dict[str, float] | None = None
    clip: float | None = None  # clipping threshold in force (1.1)
    clipped: bool = False
    skip: str | None = None  # the update was skipped: nonfinite, spike, rewind (1.1); amp: by GradScaler (1.3)
    would_skip: str | None = None  # an observing skip guard would have skipped it (1.1)
    cuda_mem: CudaMemory | None = None  # (1.2), at most once a second
    loss_scale: float | None = None  # (1.3) GradScaler's scale, on the steps it skipped (skip "amp")
    opt: str = ""  # (1.4) a step of the run's other optimizers ("1", "2"...); "": the first optimizer's
    seq: int = 0
    dropped: int = 0
    values_dropped: int = 0  # (1.6) cumulative: logged values the probe could not read (each left out alone)


@dataclass(slots=True)
class LogRecord:
    """Scalars logged when they could not join their step's record (before the first step, or late)."""

    KIND: ClassVar[RecordKind] = RecordKind.LOG
    step: int
    t: float
    values: dict[str, float] = field(default_factory=dict)
    seq: int = 0
    dropped: int = 0
    values_dropped: int = 0  # (1.6) as StepRecord.values_dropped


@dataclass(slots=True)
class AckRecord:
    """A rank's acknowledgement of a command: ``step`` is the step after which it was applied."""

    KIND: ClassVar[RecordKind] = RecordKind.ACK
    step: int
    t: float
    id: str
    action: str
    status: AckStatus
    rule: str = ""
    reason: str = ""
    apply_at_step: int | None = None
    detail: str = ""
    seq: int = 0
    dropped: int = 0


@dataclass(slots=True)
class EndRecord:
    KIND: ClassVar[RecordKind] = RecordKind.END
    step: int
    t: float
    status: EndStatus
    error: str | None = None
    exit_code: int | None = None  # (1.5) the non-zero status the script exited with (sys.exit(3)), when failed so
    seq: int = 0
    dropped: int = 0


@dataclass(slots=True)
class CheckpointRecord:
    """The script saved the probe's state after ``step`` (1.5): the agent keeps its rules' state at this point,
    for a run that resumes from this checkpoint (``id`` travels in the saved state)."""

    KIND: ClassVar[RecordKind] = RecordKind.CHECKPOINT
    step: int
    t: float
    id: str
    seq: int = 0
    dropped: int = 0


@dataclass(slots=True)
class ResumeRecord:
    """A new process continues the run after ``step`` (1.5), the first record it writes: from the saved state
    ``checkpoint`` (its id; "" when the step came from elsewhere: a framework's global_step, ``resume=N``)."""

    KIND: ClassVar[RecordKind] = RecordKind.RESUME
    step: int
    t: float
    checkpoint: str = ""
    seq: int = 0
    dropped: int = 0


@dataclass(slots=True)
class LayersRecord:
    """Per-layer statistics of a sampled step (1.2), or (1.8) of a step the probe saw spike (``trigger``)."""

    KIND: ClassVar[RecordKind] = RecordKind.LAYERS
    step: int
    t: float
    layers: list[str] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)  # one per layer, before clipping
    update_ratio: dict[str, float] = field(default_factory=dict)  # layer -> ||dw|| / ||w||, layers measured
    grad_abs_mean: list[float | None] = field(default_factory=list)  # (1.8) one per layer: mean |gradient|
    grad_zero_fraction: list[float | None] = field(default_factory=list)  # (1.8) share of exactly-zero gradients
    trigger: str = ""  # (1.8) "": every layer_stats_every steps; "spike:loss" / "spike:grad_norm": that step spiked
    seq: int = 0
    dropped: int = 0


@dataclass(slots=True)
class NonFiniteRecord:
    """Where a non-finite value came from (1.7). ``source`` "gradients": at ``step`` the parameters ``params``
    (``count`` in all) had non-finite gradients; ``module`` is the layer nearest the loss among theirs, where the
    backward pass met the bad value first. ``source`` "forward": at ``step`` (one after a non-finite step) the
    first module, in the order they finished, whose output was non-finite; "" when every output was finite (the
    bad value arose in the backward pass, or in that step's batch alone). ``value``: "nan" or "inf"."""

    KIND: ClassVar[RecordKind] = RecordKind.NONFINITE
    step: int
    t: float
    source: str  # "gradients" | "forward"
    module: str = ""
    value: str = ""
    params: list[str] = field(default_factory=list)  # the first MAX_ORIGIN_PARAMS
    count: int = 0
    seq: int = 0
    dropped: int = 0

    def text(self) -> str:
        """One line for people: ``step 1234: gradients non-finite (nan) in 4 parameter(s), nearest the loss in
        `blocks.3.attn``` or ``step 1235: first non-finite forward output in `blocks.3.attn` (inf)``."""
        if self.source == "forward":
            if not self.module:
                return (f"step {self.step}: every forward output finite (the non-finite value arose in the backward "
                        "pass, or in the bad step's batch alone)")
            return f"step {self.step}: first non-finite forward output in `{self.module}` ({self.value or 'nan'})"
        return (f"step {self.step}: gradients non-finite ({self.value or 'nan'}) in {self.count} parameter(s), "
                f"nearest the loss in `{self.module}`")


@dataclass(slots=True)
class ActivationsRecord:
    """Activation statistics of a sampled step (1.9), per activation module in the order of the forward pass:
    its kind (relu, gelu, silu, tanh, sigmoid), the layer that feeds it (its last weight matrix or kernel before
    it), its units (features; channels of a convolution), the (sample, position) pairs counted per unit, and
    ``shares``: the units' shares of those pairs where a ReLU's input was positive (active) or a tanh's /
    sigmoid's was beyond its saturation bounds, sorted, at most ``MAX_UNIT_SHARES`` evenly spaced ranks ([] for
    GELU and SiLU); ``input_mean`` and ``input_var``: over all of its input's elements."""

    KIND: ClassVar[RecordKind] = RecordKind.ACTIVATIONS
    step: int
    t: float
    modules: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    feeders: list[str] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    shares: list[list[float]] = field(default_factory=list)
    input_mean: list[float | None] = field(default_factory=list)
    input_var: list[float | None] = field(default_factory=list)
    seq: int = 0
    dropped: int = 0

    def share_below(self, module: int, threshold: float) -> float:
        """The share of a module's units whose share is under ``threshold`` (0..1); 0 without shares."""
        shares = self.shares[module] if module < len(self.shares) else []
        return sum(1 for v in shares if v < threshold) / len(shares) if shares else 0.0

    def share_above(self, module: int, threshold: float) -> float:
        shares = self.shares[module] if module < len(self.shares) else []
        return sum(1 for v in shares if v > threshold) / len(shares) if shares else 0.0


Record = (StepRecord | LogRecord | AckRecord | EndRecord | LayersRecord | CheckpointRecord | ResumeRecord
          | NonFiniteRecord | ActivationsRecord)


@dataclass(slots=True)
class CommandRecord:
    """A command of the agent to a run's probes (``control/commands.jsonl``, 1.1). ``action`` is
    shaped like a rules file's action; the probe validates it with the rules' own models."""

    id: str  # <rule>@<trigger step>: the same records always give the same id
    action: dict[str, Any]
    apply_at_step: int | None  # apply right after this step on every rank; None: after the next step
    trigger_step: int
    rule: str = ""
    reason: str = ""
    t: float = 0.0
    optimizer: str = ""  # (1.4) the optimizer a reduce_lr cuts ("1", ...); "": every optimizer of the run
    launch: str = ""  # (1.5) the launch key of the processes it is for; "": any (a resumed run's new processes
    # ignore the commands decided for the processes before them)

    @property
    def type(self) -> str:
        return str(self.action.get("type", ""))


@dataclass(slots=True)
class RunMeta:
    """``rank-<r>.meta.json``: who wrote a records file. Written once, atomically."""

    run: str
    rank: int
    world_size: int
    format_version: str = FORMAT_VERSION
    requested_run: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    host: str = ""
    pid: int = 0
    proc_start_ticks: int | None = None
    local_rank: int = 0
    start_time: float | None = None
    launch_key: str = ""
    argv: list[str] = field(default_factory=list)
    python: str = ""
    torch: str = ""
    gradwatch: str = ""
    rules: dict[str, Any] | None = None  # (1.1) rules given to the probe; None: the agent's
    guards: dict[str, Any] | None = None  # (1.1) the guards in force in the process
    dry_run: bool = False
    on_stop: str = "flag"
    steps_from: str = "optimizer"  # (1.3) what a step is: "optimizer" steps, or "backward" passes (no optimizer)
    worker: str = ""  # (1.4) a multiprocessing worker without a rank (Hogwild): its process name; rank = its index
    command_sync: str = ""  # (1.5) "collective": rank 0 hands the commands to the other ranks over torch.distributed
    # (1.6) who created the run directory: the launch key of its first processes, kept by the processes that resume
    # it; a directory recreated under the same name has another (the agent then reads it as a new run)
    run_uid: str = ""
    # (1.7) the GPUs the process uses, by UUID (as torch reports them): the agent matches them to NVML's devices,
    # whatever pid namespace the process lives in; and that namespace, so that no agent judges a pid from another
    gpu_uuids: list[str] = field(default_factory=list)
    pid_namespace: str = ""
    # (1.9) the signal on which the process writes every thread's Python stack to rank-<r>.stacks.txt (0: none),
    # and the training thread's ident, as that dump names it
    stack_signal: int = 0
    main_thread: int = 0


# -- encoding (the probe's writer thread) --------------------------------------------------------
# One C-accelerated encoder for every line (json.dumps with arguments builds a new one per call).
# NaN and infinities become the JSON extensions NaN/Infinity, which json.loads reads back.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def encode(record: Record) -> bytes:
    """One ``\\n``-terminated JSON line for ``record``."""
    return (_encode(to_json(record)) + "\n").encode()


def to_json(record: Record) -> dict[str, Any]:
    """The object of ``record``'s line: the fields every record has, its kind's fields, the optional
    ones only when set."""
    if record.__class__ is StepRecord:
        out = _step_json(record)  # type: ignore[arg-type,unused-ignore]  # the class test: fastest dispatch
    else:
        out = {"kind": record.KIND.value, "step": record.step, "t": record.t}
        if isinstance(record, LogRecord):
            out["values"] = record.values
        elif isinstance(record, AckRecord):
            out.update(id=record.id, action=record.action, rule=record.rule, reason=record.reason,
                       apply_at_step=record.apply_at_step, status=record.status.value, detail=record.detail)
        elif isinstance(record, EndRecord):
            out.update(status=record.status.value, error=record.error)
            if record.exit_code is not None:
                out["exit_code"] = record.exit_code
        elif isinstance(record, CheckpointRecord):
            out["id"] = record.id
        elif isinstance(record, ResumeRecord):
            out["checkpoint"] = record.checkpoint
        elif isinstance(record, LayersRecord):
            out.update(layers=record.layers, grad_norm=record.grad_norm, update_ratio=record.update_ratio)
            if record.grad_abs_mean:
                out.update(grad_abs_mean=record.grad_abs_mean, grad_zero_fraction=record.grad_zero_fraction)
            if record.trigger:
                out["trigger"] = record.trigger
        elif isinstance(record, NonFiniteRecord):
            out.update(source=record.source, module=record.module, value=record.value, params=record.params,
                       count=record.count)
        elif isinstance(record, ActivationsRecord):
            out.update(modules=record.modules, kinds=record.kinds, feeders=record.feeders, units=record.units,
                       samples=record.samples, shares=record.shares, input_mean=record.input_mean,
                       input_var=record.input_var)
        else:
            raise TypeError(f"not a spool record: {type(record).__name__}")
    out["seq"] = record.seq
    if record.dropped:  # cumulative; absent means none so far
        out["dropped"] = record.dropped
    if (record.__class__ is StepRecord or record.__class__ is LogRecord) and record.values_dropped:
        out["values_dropped"] = record.values_dropped
    return out


def _step_json(r: StepRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "step", "step": r.step, "t": r.t, "grad_norm": r.grad_norm, "lr": r.lr,
                           "dur": r.dur, "wait": r.wait}
    if r.values is not None:
        out["values"] = r.values
    if r.clip is not None:
        out["clip"] = r.clip
        out["clipped"] = r.clipped
    if r.skip is not None:
        out["skip"] = r.skip
    if r.would_skip is not None:
        out["would_skip"] = r.would_skip
    if r.loss_scale is not None:
        out["loss_scale"] = r.loss_scale
    if r.opt:
        out["opt"] = r.opt
    if r.cuda_mem is not None:
        m = r.cuda_mem
        out["cuda_mem"] = {"allocated": m.allocated, "reserved": m.reserved, "peak": m.peak, "total": m.total,
                           **({"device": m.device} if m.device is not None else {})}
    return out


def encode_command(command: CommandRecord) -> bytes:
    return (_encode({"id": command.id, "t": command.t, "rule": command.rule, "reason": command.reason,
                     "trigger_step": command.trigger_step, "action": command.action,
                     "apply_at_step": command.apply_at_step,
                     **({"optimizer": command.optimizer} if command.optimizer else {}),
                     **({"launch": command.launch} if command.launch else {})}) + "\n").encode()


def meta_to_json(meta: RunMeta) -> dict[str, Any]:
    """The metadata file's object (also what the agent's checkpoint keeps)."""
    return {
        "format": FORMAT_NAME, "format_version": meta.format_version, "run": meta.run,
        "requested_run": meta.requested_run, "labels": meta.labels, "host": meta.host, "pid": meta.pid,
        "proc_start_ticks": meta.proc_start_ticks, "rank": meta.rank, "local_rank": meta.local_rank,
        "world_size": meta.world_size, "start_time": meta.start_time, "launch_key": meta.launch_key,
        "argv": meta.argv, "python": meta.python, "torch": meta.torch, "gradwatch": meta.gradwatch,
        "rules": meta.rules, "guards": meta.guards, "dry_run": meta.dry_run, "on_stop": meta.on_stop,
        "steps_from": meta.steps_from, **({"worker": meta.worker} if meta.worker else {}),
        **({"command_sync": meta.command_sync} if meta.command_sync else {}),
        **({"run_uid": meta.run_uid} if meta.run_uid else {}),
        **({"gpu_uuids": meta.gpu_uuids} if meta.gpu_uuids else {}),
        **({"pid_namespace": meta.pid_namespace} if meta.pid_namespace else {}),
        **({"stack_signal": meta.stack_signal, "main_thread": meta.main_thread} if meta.stack_signal else {}),
    }


# -- decoding (the agent, gradwatch status, the probe's command reader, the tests) ---------------
def _number(value: Any) -> float | None:
    """A JSON number as a float (NaN and infinities kept); anything else is None."""
    if value.__class__ is float:
        return value  # type: ignore[no-any-return,unused-ignore]  # a float, by the class test
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    return None


def _count(value: Any) -> int | None:
    """A non-negative integer that fits 64 bits, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT:
        return value
    return None


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _values(value: Any) -> dict[str, float] | None:
    """Named scalars: names bounded, non-numbers dropped, at most MAX_VALUES."""
    if not isinstance(value, dict):
        return None
    out: dict[str, float] = {}
    for name, raw in value.items():
        number = raw if raw.__class__ is float else _number(raw)
        if number is not None and name.__class__ is str and name:
            out[name if len(name) <= MAX_NAME else name[:MAX_NAME]] = number
            if len(out) >= MAX_VALUES:
                break
    return out


def _common(obj: dict[str, Any]) -> tuple[int, float, int, int]:
    step = _count(obj.get("step"))
    if step is None:
        raise RecordError("invalid", "field 'step' missing or not a non-negative integer")
    t = _number(obj.get("t"))
    if t is None or not math.isfinite(t):
        raise RecordError("invalid", "field 't' missing or not a finite number")
    return step, t, _count(obj.get("seq")) or 0, _count(obj.get("dropped")) or 0


def _decode_step(obj: dict[str, Any], step: int, t: float, seq: int, dropped: int) -> StepRecord:
    get = obj.get
    lrs, memory, opt = get("lr"), get("cuda_mem"), get("opt")
    # the fields a step often lacks are looked at only when present (the agent decodes 10,000s a second)
    return StepRecord(
        step=step, t=t, grad_norm=_number(get("grad_norm")),
        lr=[v for v in map(_number, lrs[:MAX_LRS]) if v is not None] if lrs.__class__ is list else [],
        dur=_number(get("dur")), wait=_number(get("wait")), values=_values(get("values")),
        clip=_number(obj["clip"]) if "clip" in obj else None, clipped=get("clipped") is True,
        skip=_text(obj["skip"], 40) if "skip" in obj else None,
        would_skip=_text(obj["would_skip"], 40) if "would_skip" in obj else None,
        cuda_mem=CudaMemory(allocated=_number(memory.get("allocated")), reserved=_number(memory.get("reserved")),
                            peak=_number(memory.get("peak")), total=_number(memory.get("total")),
                            device=_count(memory.get("device")))
        if isinstance(memory, dict) else None,
        loss_scale=_number(obj["loss_scale"]) if "loss_scale" in obj else None,
        opt=_optimizer_name(opt) if opt is not None else "", seq=seq, dropped=dropped,
        values_dropped=(_count(obj["values_dropped"]) or 0) if "values_dropped" in obj else 0)


def _optimizer_name(value: Any) -> str:
    """A step's optimizer: a short label value, "" (the first optimizer) when absent or not one."""
    name = _text(value, MAX_OPTIMIZER_NAME)
    return name if name and name != "0" and name.replace("_", "").replace("-", "").isalnum() else ""


def _decode_ack(obj: dict[str, Any], step: int, t: float, seq: int, dropped: int) -> AckRecord:
    command = _text(obj.get("id"), MAX_NAME)
    if not command:
        raise RecordError("invalid", "ack record without a command 'id'")
    try:
        status = AckStatus(obj.get("status"))
    except ValueError:
        raise RecordError("invalid", f"ack status {str(obj.get('status'))[:40]!r} is not one of "
                                     f"{[s.value for s in AckStatus]}") from None
    return AckRecord(step=step, t=t, id=command, action=_text(obj.get("action"), MAX_NAME) or "", status=status,
                     rule=_text(obj.get("rule"), MAX_NAME) or "", reason=_text(obj.get("reason"), MAX_NAME) or "",
                     apply_at_step=_count(obj.get("apply_at_step")), detail=_text(obj.get("detail")) or "",
                     seq=seq, dropped=dropped)


def _decode_end(obj: dict[str, Any], step: int, t: float, seq: int, dropped: int) -> EndRecord:
    status = obj.get("status")
    # an unknown status is a process that did not end cleanly as far as we can tell
    end = EndStatus(status) if status in ("finished", "stopped", "interrupted") else EndStatus.FAILED
    code = obj.get("exit_code")
    exit_code = code if isinstance(code, int) and not isinstance(code, bool) and -MAX_INT <= code <= MAX_INT else None
    return EndRecord(step=step, t=t, status=end, error=_text(obj.get("error")), seq=seq, dropped=dropped,
                     exit_code=exit_code)


def _decode_checkpoint(obj: dict[str, Any], step: int, t: float, seq: int, dropped: int) -> CheckpointRecord:
    checkpoint = _text(obj.get("id"), MAX_NAME)
    if not checkpoint:
        raise RecordError("invalid", "checkpoint record without an 'id'")
    return CheckpointRecord(step=step, t=t, id=checkpoint, seq=seq, dropped=dropped)


def _decode_resume(obj: dict[str, Any], step: int, t: float, seq: int, dropped: int) -> ResumeRecord:
    return ResumeRecord(step=step, t=t, checkpoint=_text(obj.get("checkpoint"), MAX_NAME) or "", seq=seq,
                        dropped=dropped)


def _per_layer(value: Any, layers: int) -> list[float | None]:
    return [_number(v) for v in value[:layers]] if isinstance(value, list) else []


def _decode_layers(obj: dict[str, Any], step: int, t: float, seq: int, dropped: int) -> LayersRecord:
    names, norms, ratios = obj.get("layers"), obj.get("grad_norm"), obj.get("update_ratio")
    layers = [str(n)[:MAX_NAME] for n in names[:MAX_LAYERS]] if isinstance(names, list) else []
    return LayersRecord(
        step=step, t=t, layers=layers,
        grad_norm=[_number(v) for v in norms[:len(layers)]] if isinstance(norms, list) else [],
        grad_abs_mean=_per_layer(obj.get("grad_abs_mean"), len(layers)),
        grad_zero_fraction=_per_layer(obj.get("grad_zero_fraction"), len(layers)),
        update_ratio={str(k)[:MAX_NAME]: ratio for k, raw in list(ratios.items())[:MAX_LAYERS]
                      if (ratio := _number(raw)) is not None} if isinstance(ratios, dict) else {},
        trigger=_text(obj.get("trigger"), MAX_NAME) or "", seq=seq, dropped=dropped)


def _decode_nonfinite(obj: dict[str, Any], step: int, t: float, seq: int, dropped: int) -> NonFiniteRecord:
    source = obj.get("source")
    if source not in ("gradients", "forward"):
        raise RecordError("invalid", "nonfinite record: field 'source' must be 'gradients' or 'forward'")
    params = obj.get("params")
    value = obj.get("value")
    return NonFiniteRecord(
        step=step, t=t, source=source, module=_text(obj.get("module"), MAX_NAME) or "",
        value=value if value in ("nan", "inf") else "",
        params=[str(p)[:MAX_NAME] for p in params[:MAX_ORIGIN_PARAMS]] if isinstance(params, list) else [],
        count=_count(obj.get("count")) or 0, seq=seq, dropped=dropped)


def _names(value: Any, limit: int) -> list[str]:
    return [str(v)[:MAX_NAME] for v in value[:limit]] if isinstance(value, list) else []


def _decode_activations(obj: dict[str, Any], step: int, t: float, seq: int, dropped: int) -> ActivationsRecord:
    modules = _names(obj.get("modules"), MAX_LAYERS)
    n = len(modules)

    def names(key: str) -> list[str]:
        given = _names(obj.get(key), n)
        return given + [""] * (n - len(given))

    def counts(key: str) -> list[int]:
        given = [_count(v) or 0 for v in obj.get(key, [])[:n]] if isinstance(obj.get(key), list) else []
        return given + [0] * (n - len(given))

    def numbers(key: str) -> list[float | None]:
        given = _per_layer(obj.get(key), n)
        return given + [None] * (n - len(given))
    raw = obj.get("shares")
    shares = [[v for x in per[:MAX_UNIT_SHARES] if (v := _number(x)) is not None and 0.0 <= v <= 1.0]
              if isinstance(per, list) else [] for per in (raw[:n] if isinstance(raw, list) else [])]
    return ActivationsRecord(step=step, t=t, modules=modules, kinds=names("kinds"), feeders=names("feeders"),
                             units=counts("units"), samples=counts("samples"),
                             shares=shares + [[] for _ in range(n - len(shares))], input_mean=numbers("input_mean"),
                             input_var=numbers("input_var"), seq=seq, dropped=dropped)


def _decode_log(obj: dict[str, Any], step: int, t: float, seq: int, dropped: int) -> LogRecord:
    return LogRecord(step=step, t=t, values=_values(obj.get("values")) or {}, seq=seq, dropped=dropped,
                     values_dropped=_count(obj.get("values_dropped")) or 0)


_DECODERS: dict[str, Callable[[dict[str, Any], int, float, int, int], Record]] = {
    RecordKind.STEP.value: _decode_step, RecordKind.LOG.value: _decode_log, RecordKind.ACK.value: _decode_ack,
    RecordKind.END.value: _decode_end, RecordKind.LAYERS.value: _decode_layers,
    RecordKind.CHECKPOINT.value: _decode_checkpoint, RecordKind.RESUME.value: _decode_resume,
    RecordKind.NONFINITE.value: _decode_nonfinite, RecordKind.ACTIVATIONS.value: _decode_activations,
}


def decode(obj: Any) -> Record | None:
    """The record a decoded JSON line holds; None for a kind of a newer minor version (skipped, not
    an error). Raises RecordError for a line that is not a valid record."""
    if not isinstance(obj, dict):
        raise RecordError("invalid", "not a JSON object")
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise RecordError("invalid", "field 'kind' missing or not a string")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        return None
    return decoder(obj, *_common(obj))


def decode_line(line: bytes | str) -> Record | None:
    """decode() of one JSON line; a line that is not JSON raises RecordError('malformed')."""
    try:
        obj = _fast_loads(line)
    except ValueError:  # orjson refuses NaN, Infinity and integers beyond 64 bits, which json reads
        try:
            obj = json.loads(line)
        except ValueError:
            raise RecordError("malformed", "not a JSON line") from None
    return decode(obj)


def decode_command(obj: Any) -> CommandRecord:
    """A command line's object; raises RecordError naming the field that is wrong."""
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
        raise RecordError("invalid", "not an object with an 'id'")
    action = obj.get("action")
    if not isinstance(action, dict):
        raise RecordError("invalid", f"field 'action' must be an object, got {str(action)[:80]!r}")
    apply_at = obj.get("apply_at_step")
    if apply_at is not None and _count(apply_at) is None:
        raise RecordError("invalid", "field 'apply_at_step' must be a non-negative integer or null")
    return CommandRecord(id=obj["id"][:MAX_NAME], action=action, apply_at_step=apply_at,
                         trigger_step=_count(obj.get("trigger_step")) or 0, rule=_text(obj.get("rule"), MAX_NAME) or "",
                         reason=_text(obj.get("reason"), MAX_NAME) or "", t=_number(obj.get("t")) or 0.0,
                         optimizer=_text(obj.get("optimizer"), MAX_OPTIMIZER_NAME) or "",
                         launch=_text(obj.get("launch"), MAX_NAME) or "")


def decode_meta(obj: Any) -> RunMeta:
    """The metadata file's object; raises RecordError naming the field that is missing or wrong.
    (The format name and version are checked by spool.reader.read_meta, which knows the file.)"""
    if not isinstance(obj, dict):
        raise RecordError("invalid", "not a JSON object")
    for key, kind in (("run", str), ("rank", int), ("world_size", int)):
        if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool):
            raise RecordError("invalid", f"field {key!r} missing or not {kind.__name__}")
    if _count(obj["rank"]) is None or not 1 <= obj["world_size"] <= MAX_INT:
        raise RecordError("invalid", f"rank {obj['rank']} or world_size {obj['world_size']} out of range "
                                     "(rank >= 0, world_size >= 1)")
    labels = obj.get("labels")
    argv = obj.get("argv")
    gpus = obj.get("gpu_uuids")
    return RunMeta(
        run=obj["run"][:MAX_NAME], rank=obj["rank"], world_size=obj["world_size"],
        format_version=str(obj.get("format_version", ""))[:20], requested_run=_text(obj.get("requested_run")) or "",
        labels={str(k)[:MAX_NAME]: str(v)[:MAX_TEXT] for k, v in list(labels.items())[:64]}
        if isinstance(labels, dict) else {},
        host=_text(obj.get("host"), MAX_NAME) or "", pid=_count(obj.get("pid")) or 0,
        proc_start_ticks=_count(obj.get("proc_start_ticks")), local_rank=_count(obj.get("local_rank")) or 0,
        start_time=_number(obj.get("start_time")), launch_key=_text(obj.get("launch_key"), MAX_NAME) or "",
        argv=[str(a)[:MAX_TEXT] for a in argv[:256]] if isinstance(argv, list) else [],
        python=_text(obj.get("python"), 40) or "", torch=_text(obj.get("torch"), 80) or "",
        gradwatch=_text(obj.get("gradwatch"), 40) or "",
        rules=obj["rules"] if isinstance(obj.get("rules"), dict) else None,
        guards=obj["guards"] if isinstance(obj.get("guards"), dict) else None,
        dry_run=obj.get("dry_run") is True, on_stop=_text(obj.get("on_stop"), 20) or "flag",
        steps_from="backward" if obj.get("steps_from") == "backward" else "optimizer",
        worker=_text(obj.get("worker"), MAX_NAME) or "",
        command_sync="collective" if obj.get("command_sync") == "collective" else "",
        run_uid=_text(obj.get("run_uid"), MAX_NAME) or "",
        gpu_uuids=[u[:MAX_UUID] for u in gpus[:MAX_GPUS] if isinstance(u, str)] if isinstance(gpus, list) else [],
        pid_namespace=_text(obj.get("pid_namespace"), MAX_UUID) or "",
        stack_signal=signal if (signal := _count(obj.get("stack_signal"))) is not None and signal <= 64 else 0,
        main_thread=_count(obj.get("main_thread")) or 0)


def merge_logged(records: list[Record]) -> list[Record]:
    """The records of one file with each log record that directly follows the step record of the same
    step merged into that step's ``values``, as the probe merges them when both are queued together. A
    reader of a whole file (``gradwatch status``, the tests) then sees one shape whatever the threads'
    timing; the agent, which reads as the file grows, treats the two forms alike as they arrive."""
    out: list[Record] = []
    last: StepRecord | None = None  # the first optimizer's newest step (another optimizer's may come between)
    for record in records:
        previous = out[-1] if out else None
        behind = previous is last or (isinstance(previous, StepRecord) and previous.opt)
        if isinstance(record, LogRecord) and last is not None and behind and last.step == record.step:
            last.values = {**(last.values or {}), **record.values}
            continue
        if isinstance(record, StepRecord) and not record.opt:
            last = record
        elif not (isinstance(record, StepRecord) and record.opt):
            last = None
        out.append(record)
    return out
