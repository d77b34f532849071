"""What the training thread hands the writer thread, and how the writer turns it into records.

The training thread builds one small NamedTuple per record (as cheap as a plain tuple) whose
numbers may still be on the device (``readback``); the writer thread resolves them into the
typed records of ``spool.records`` once the copies have landed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gradwatch.probes import readback
from gradwatch.probes.activations import ActivationsCapture
from gradwatch.spool.records import (
    AckRecord,
    AckStatus,
    ActivationsRecord,
    CheckpointRecord,
    LayersRecord,
    LogRecord,
    Record,
    StepRecord,
)

#: What the guards did at one step (values may be deferred): (clip threshold or None, clipped,
#: skip reason or None, observed skip reason or None).
GuardInfo = tuple[Any, Any, Any, Any]


class StepCapture(NamedTuple):
    step: int
    t: float
    dur: float | None
    wait: float | None
    grad_norm: Any  # float, None or a readback.Deferred
    lrs: list[Any]
    guard: GuardInfo | None
    script_clip: float | None = None  # max_norm of the script's clip_grad_norm_ whose result is grad_norm
    loss_scale: Any = None  # GradScaler's scale (maybe deferred), on the steps it skipped
    opt: str = ""  # a step of another optimizer than the first: its name
    values: dict[str, Any] | None = None  # that step's scalars (its loss), captured with it
    parts: Any = None  # (per-tensor norms, their parameters' indices): to name non-finite gradients (nonfinite.py)


class LogCapture(NamedTuple):
    step: int
    t: float
    values: dict[str, Any]  # name -> float or readback.Deferred


class AckCapture(NamedTuple):
    step: int
    t: float
    command: Any  # probes.control.Command
    status: AckStatus
    detail: str


class LayersCapture(NamedTuple):
    step: int
    t: float
    names: tuple[str, ...]
    vector: readback.Deferred  # per layer: gradient norm, mean |gradient|, share of zeros; then covered layers' ratios
    n_layers: int
    covered: tuple[int, ...]


# a checkpoint has no device values; ForwardFlags (nonfinite.py) are a forward check's
Capture = (StepCapture | LogCapture | AckCapture | LayersCapture | ActivationsCapture | CheckpointRecord
           | readback.Deferred)


def _measured(values: list[float] | list[float | None]) -> list[float | None]:
    """None for a layer the sample has no figure of (NaN: no gradient at that step, a frozen layer)."""
    return [None if v is None or v != v else v for v in values]


def _resolve_values(values: dict[str, Any], unreadable: list[tuple[str, str]] | None) -> dict[str, float] | None:
    """The logged values as numbers (None while one is still being copied from the device). A value that
    cannot be read (a tensor on the meta device, a freed buffer) is left out alone and named in ``unreadable``:
    the step's other values and its record stay."""
    resolved = {}
    for name, value in values.items():
        if value.__class__ is float or value.__class__ is int:  # most are: skip the call
            resolved[name] = value
            continue
        try:
            number = readback.resolve(value)
        except Exception as exc:  # one value's failure is that value's, not the step's
            if unreadable is not None:
                unreadable.append((name, f"{type(exc).__name__}: {exc}"))
            continue
        if number is readback.NOT_READY:
            return None
        resolved[name] = number
    return resolved


def _apply_guard(record: StepRecord, guard: GuardInfo) -> bool:
    """Put the guard's outcome into the step record; False while a device value is in flight."""
    threshold, clipped, skip, observed = (readback.resolve(v) for v in guard)
    if readback.NOT_READY in (threshold, clipped, skip, observed):
        return False
    if threshold is not None:
        record.clip = threshold
        record.clipped = bool(clipped)
    if isinstance(skip, float):  # the device path hands over found_inf as 0.0/1.0
        skip = "nonfinite" if skip else None
    if isinstance(observed, float):
        observed = "nonfinite" if observed else None
    record.skip = skip or None
    record.would_skip = observed or None
    return True


def to_record(item: Capture, logged: LogCapture | None = None,
              unreadable: list[tuple[str, str]] | None = None) -> Record | None:
    """The record for a queue item (with the scalars logged right after a step merged into it), or None
    while a device value is still in flight. Logged values that cannot be read are left out and named in
    ``unreadable`` (name, why)."""
    if item.__class__ is StepCapture:
        step: StepCapture = item  # type: ignore[assignment,unused-ignore]  # by the class test
        norm = step.grad_norm
        if norm is not None and norm.__class__ is not float:
            norm = readback.resolve(norm)
        lrs = step.lrs
        if any(lr.__class__ is not float for lr in lrs):
            lrs = [readback.resolve(lr) for lr in lrs]
        if norm is readback.NOT_READY or readback.NOT_READY in lrs:
            return None
        record = StepRecord(step=step.step, t=step.t, grad_norm=norm, lr=lrs, dur=step.dur, wait=step.wait)
        if step.guard is not None:
            if not _apply_guard(record, step.guard):
                return None
        elif step.script_clip is not None:
            record.clip = step.script_clip
            # torch scales the gradients by max_norm / (norm + 1e-6) when that is below 1
            record.clipped = isinstance(norm, float) and norm + 1e-6 > step.script_clip
        if step.loss_scale is not None and record.skip == "amp":  # the scale that overflowed
            scale = readback.resolve(step.loss_scale)
            if scale is readback.NOT_READY:
                return None
            record.loss_scale = scale
        if logged is not None or step.values:
            values = _resolve_values(logged.values if logged is not None else step.values,  # type: ignore[arg-type]
                                     unreadable)
            if values is None:
                return None
            record.values = values
        record.opt = step.opt
        return record
    if isinstance(item, LogCapture):
        values = _resolve_values(item.values, unreadable)
        return None if values is None else LogRecord(step=item.step, t=item.t, values=values)
    if isinstance(item, AckCapture):
        c = item.command
        return AckRecord(step=item.step, t=item.t, id=c.id, action=c.type, rule=c.rule, reason=c.reason,
                         apply_at_step=c.apply_at_step, status=item.status, detail=item.detail)
    if isinstance(item, LayersCapture):
        vector = readback.resolve(item.vector)
        if vector is readback.NOT_READY:
            return None
        names, n = item.names, item.n_layers
        return LayersRecord(step=item.step, t=item.t, layers=list(names), grad_norm=vector[:n],
                            grad_abs_mean=_measured(vector[n:2 * n]), grad_zero_fraction=_measured(vector[2 * n:3 * n]),
                            update_ratio={names[layer]: ratio for layer, ratio in zip(item.covered, vector[3 * n:],
                                                                                         strict=False)})
    if isinstance(item, ActivationsCapture):
        return _activations(item)
    if isinstance(item, CheckpointRecord):
        return item
    if isinstance(item, readback.Deferred):  # a forward check's flags: its NonFiniteRecord once read
        record = item.resolve()
        return None if record is readback.NOT_READY else record
    raise TypeError(f"not a capture: {type(item).__name__}")


def _activations(item: ActivationsCapture) -> ActivationsRecord | None:
    vector = readback.resolve(item.vector)
    if vector is readback.NOT_READY:
        return None
    shares, at = [], 0
    for count in item.shares:
        shares.append([min(max(v, 0.0), 1.0) for v in vector[at:at + count]])
        at += count
    n = len(item.modules)
    totals, squares = vector[at:at + n], vector[at + n:at + 2 * n]
    means = [total / size if size else None for total, size in zip(totals, item.elements, strict=True)]
    spread = [square / size - mean * mean if size and mean is not None else None
              for square, size, mean in zip(squares, item.elements, means, strict=True)]
    return ActivationsRecord(step=item.step, t=item.t, modules=list(item.modules), kinds=list(item.kinds),
                             feeders=list(item.feeders), units=list(item.units), samples=list(item.samples),
                             shares=shares, input_mean=_measured(means), input_var=_measured(
                                 [max(v, 0.0) if v is not None and v == v else v for v in spread]))
