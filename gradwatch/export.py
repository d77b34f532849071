"""``gradwatch export``: a run's whole history as CSV, JSON lines, Parquet or TensorBoard event files.

One table for CSV, JSON lines and Parquet: a row per recorded step (every optimizer's), per scalar logged
apart from a step, per action the probe applied or refused, per checkpoint, resume and end, and per decision
of the agent's rules; a ``kind`` column says which. Numbers are written as recorded (CSV with Python's shortest
round-trip form; NaN and infinities as ``nan``/``inf``, JSON's ``NaN``/``Infinity`` as in the spool). JSON lines
add the per-layer statistics (``kind: layers``). TensorBoard gets one event directory per rank, its scalars
tagged as logged (``loss``, ``val_loss``) and gradwatch's own under ``gradwatch/``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from gradwatch.errors import GradwatchError, MissingExtraError
from gradwatch.history import RankHistory, RunHistory
from gradwatch.spool.records import (
    AckRecord,
    CheckpointRecord,
    EndRecord,
    LayersRecord,
    LogRecord,
    NonFiniteRecord,
    ResumeRecord,
    StepRecord,
)

FORMATS = ("csv", "jsonl", "parquet", "tensorboard")

STEP_COLUMNS = ["kind", "rank", "step", "time", "optimizer", "grad_norm", "step_seconds", "data_wait_seconds",
                "clip_threshold", "clipped", "skip", "loss_scale", "cuda_memory_allocated_bytes",
                "cuda_memory_reserved_bytes", "cuda_memory_peak_bytes"]
EVENT_COLUMNS = ["id", "action", "rule", "reason", "status", "detail", "apply_at_step", "mode", "metric", "sent",
                 "error", "exit_code", "checkpoint"]


def rows(run: RunHistory, with_layers: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the run: the table CSV and Parquet write, rank by rank in the order the records were
    written, then the agent's decisions. Learning rates are ``lr_<group>``; logged scalars keep their names
    (``value.<name>`` where one is a column name already). ``with_layers``: per-layer rows too (JSON lines)."""
    out: list[dict[str, Any]] = []
    groups = 0
    names: dict[str, None] = {}
    for rank in sorted(run.ranks):
        history = run.ranks[rank]
        for record in history.records:
            row = _layers_row(rank, record) if with_layers and isinstance(record, LayersRecord) else _row(rank, record)
            if row is None:
                continue
            if isinstance(record, StepRecord):
                groups = max(groups, len(record.lr))
            if isinstance(record, (StepRecord, LogRecord)):
                names.update(dict.fromkeys(record.values or {}))
            out.append(row)
    for event in run.decisions:
        action = event.get("action")
        details = event.get("details")
        out.append({"kind": "decision", "rank": event.get("rank", 0), "step": event.get("step"), "time": event.get("t"),
                    "id": event.get("id"), "action": action.get("type") if isinstance(action, dict) else action,
                    "rule": event.get("rule"), "reason": event.get("reason"), "mode": event.get("mode"),
                    "metric": event.get("metric"), "sent": event.get("sent"), "apply_at_step": event.get("apply_at_step"),
                    "detail": event.get("note") or (json.dumps(details, separators=(",", ":"), default=str)
                                                    if details else None)})
    value_columns = {name: f"value.{name}" if name in STEP_COLUMNS or name in EVENT_COLUMNS or name.startswith("lr_")
                     else name for name in names}
    for row in out:
        values = row.pop("values", None) or {}
        for group, lr in enumerate(row.pop("lr", None) or []):
            row[f"lr_{group}"] = lr
        for name, value in values.items():
            row[value_columns[name]] = value
    columns = STEP_COLUMNS + [f"lr_{g}" for g in range(groups)] + list(value_columns.values()) + EVENT_COLUMNS
    return columns, out


def _row(rank: int, record: Any) -> dict[str, Any] | None:
    base = {"kind": record.KIND.value, "rank": rank, "step": record.step, "time": record.t}
    if isinstance(record, StepRecord):
        memory = record.cuda_mem
        return {**base, "optimizer": record.opt or "0", "grad_norm": record.grad_norm, "lr": record.lr,
                "step_seconds": record.dur, "data_wait_seconds": record.wait, "clip_threshold": record.clip,
                "clipped": record.clipped if record.clip is not None else None, "skip": record.skip, "loss_scale": record.loss_scale,
                "cuda_memory_allocated_bytes": memory.allocated if memory else None,
                "cuda_memory_reserved_bytes": memory.reserved if memory else None,
                "cuda_memory_peak_bytes": memory.peak if memory else None, "values": record.values}
    if isinstance(record, LogRecord):
        return {**base, "values": record.values}
    if isinstance(record, AckRecord):
        return {**base, "kind": "action", "id": record.id, "action": record.action, "rule": record.rule,
                "reason": record.reason, "status": record.status.value, "detail": record.detail,
                "apply_at_step": record.apply_at_step}
    if isinstance(record, EndRecord):
        return {**base, "status": record.status.value, "error": record.error, "exit_code": record.exit_code}
    if isinstance(record, CheckpointRecord):
        return {**base, "id": record.id}
    if isinstance(record, ResumeRecord):
        return {**base, "checkpoint": record.checkpoint}
    if isinstance(record, NonFiniteRecord):
        return {**base, "action": record.source, "detail": record.text(), "status": record.value}
    return None  # layers: JSON lines and TensorBoard


def write(run: RunHistory, fmt: str, output: Path | None,
          progress: Callable[[str], None] = lambda message: None) -> Path | None:
    """Write the export; returns where (None: written to standard output, ``output`` of ``-``)."""
    if fmt not in FORMATS:
        raise GradwatchError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    to_stdout = output is not None and str(output) == "-"
    if to_stdout and fmt in ("parquet", "tensorboard"):
        raise GradwatchError(f"{fmt} cannot go to standard output; give -o PATH")
    target = output or Path(f"{run.name}.{fmt}" if fmt != "tensorboard" else f"{run.name}-tensorboard")
    if fmt == "tensorboard":
        return _tensorboard(run, target, progress)
    if fmt == "parquet":
        return _parquet(run, target)
    if to_stdout:
        import sys

        (_csv if fmt == "csv" else _jsonl)(run, sys.stdout)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="", encoding="utf-8") as f:
        (_csv if fmt == "csv" else _jsonl)(run, f)
    return target


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest form that reads back as the same float
    return value


def _csv(run: RunHistory, f: IO[str]) -> None:
    columns, table = rows(run)
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: _cell(v) for k, v in row.items()})


def _jsonl(run: RunHistory, f: IO[str]) -> None:
    _, table = rows(run, with_layers=True)
    for row in table:
        f.write(json.dumps({k: v for k, v in row.items() if v is not None}, separators=(",", ":")) + "\n")


def _layers_row(rank: int, record: LayersRecord) -> dict[str, Any]:
    return {"kind": "layers", "rank": rank, "step": record.step, "time": record.t, "trigger": record.trigger or None,
            "layers": {name: {"grad_norm": norm, **({"update_ratio": record.update_ratio[name]}
                                                    if name in record.update_ratio else {})}
                       for name, norm in zip(record.layers, record.grad_norm, strict=False)}}


def _parquet(run: RunHistory, target: Path) -> Path:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("--format parquet needs pyarrow: pip install 'gradwatch[export]'") from None
    columns, table = rows(run)
    data = {column: [row.get(column) for row in table] for column in columns}
    arrays = {}
    for column, values in data.items():
        try:
            arrays[column] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in a logged column: kept as text
            arrays[column] = pa.array([None if v is None else str(v) for v in values])
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), target)
    return target


def _tensorboard(run: RunHistory, target: Path, progress: Callable[[str], None]) -> Path:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtraError("--format tensorboard needs torch and tensorboard: pip install "
                                "'gradwatch[tensorboard]'") from None
    for rank, history in sorted(run.ranks.items()):
        directory = target / f"rank-{rank}"
        writer = SummaryWriter(log_dir=str(directory))
        try:
            _tensorboard_rank(history, writer.add_scalar, writer.add_text)
        finally:
            writer.close()
        progress(f"rank {rank}: {len(history.steps)} steps -> {directory}")
    return target


def _tensorboard_rank(history: RankHistory, scalar: Callable[..., Any], text: Callable[..., Any]) -> None:
    for record in history.records:
        step, t = record.step, record.t
        if isinstance(record, StepRecord):
            prefix = "gradwatch" if not record.opt else f"gradwatch/optimizer_{record.opt}"
            for tag, value in _step_scalars(record):
                scalar(f"{prefix}/{tag}", value, step, walltime=t)
            for name, value in (record.values or {}).items():
                scalar(name if not record.opt else f"{name}/optimizer_{record.opt}", value, step, walltime=t)
        elif isinstance(record, LogRecord):
            for name, value in record.values.items():
                scalar(name, value, step, walltime=t)
        elif isinstance(record, LayersRecord):
            for name, norm in zip(record.layers, record.grad_norm, strict=False):
                if norm is not None:
                    scalar(f"gradwatch/layer_grad_norm/{name}", norm, step, walltime=t)
            for name, ratio in record.update_ratio.items():
                scalar(f"gradwatch/layer_update_ratio/{name}", ratio, step, walltime=t)
        elif isinstance(record, AckRecord):
            text("gradwatch/actions", f"{record.action} ({record.rule}: {record.reason}) {record.status.value}: "
                 f"{record.detail}", step, walltime=t)
        elif isinstance(record, EndRecord):
            text("gradwatch/end", f"{record.status.value}" + (f": {record.error}" if record.error else ""), step,
                 walltime=t)


def _step_scalars(record: StepRecord) -> Iterable[tuple[str, float]]:
    if record.grad_norm is not None:
        yield "grad_norm", record.grad_norm
    for group, lr in enumerate(record.lr):
        yield f"lr/group_{group}", lr
    if record.dur is not None:
        yield "step_seconds", record.dur
    if record.wait is not None:
        yield "data_wait_seconds", record.wait
    if record.clip is not None:
        yield "clip_threshold", record.clip
    if record.skip:
        yield "skipped", 1.0
    if record.cuda_mem is not None and record.cuda_mem.allocated is not None:
        yield "cuda_memory_allocated_bytes", record.cuda_mem.allocated


def to_text(run: RunHistory, fmt: str) -> str:
    """The CSV or JSON lines export as a string (tests, small runs)."""
    buffer = io.StringIO()
    (_csv if fmt == "csv" else _jsonl)(run, buffer)
    return buffer.getvalue()
