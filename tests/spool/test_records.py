"""The record contract (gradwatch.spool.records): every kind survives encode and decode; decoding an
untrusted line keeps what is valid, bounds what is large and rejects only what no reader could use."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch.spool import records as rec
from gradwatch.spool.records import (
    AckRecord,
    AckStatus,
    CommandRecord,
    CudaMemory,
    EndRecord,
    EndStatus,
    LayersRecord,
    LogRecord,
    RecordError,
    RunMeta,
    StepRecord,
    decode,
    decode_command,
    decode_line,
    decode_meta,
    encode,
    encode_command,
    merge_logged,
    meta_to_json,
)

EXAMPLES = [
    StepRecord(step=1, t=1.5, grad_norm=0.5, lr=[0.1, 0.01], dur=0.01, wait=0.001, seq=1),
    StepRecord(step=2, t=2.5, grad_norm=math.inf, lr=[0.1], dur=None, wait=None, values={"loss": 0.7, "n": 3.0},
               clip=1.0, clipped=True, skip="nonfinite", would_skip="spike",
               cuda_mem=CudaMemory(allocated=1.0, reserved=2.0, peak=3.0, total=4.0), seq=2, dropped=5),
    LogRecord(step=0, t=0.5, values={"val_loss": 0.25}, seq=3),
    AckRecord(step=7, t=3.0, id="cut@5", action="reduce_lr", status=AckStatus.LATE, rule="cut", reason="spike",
              apply_at_step=6, detail="lr 0.1->0.05", seq=4),
    EndRecord(step=9, t=4.0, status=EndStatus.FAILED, error="RuntimeError('x')", seq=5),
    LayersRecord(step=10, t=5.0, layers=["0", "2"], grad_norm=[0.5, None], update_ratio={"0": 0.001}, seq=6),
]


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_every_kind_survives_encode_and_decode(record: rec.Record) -> None:
    line = encode(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_line(line) == record


def test_nan_is_written_as_the_json_extension_and_read_back() -> None:
    line = encode(StepRecord(step=1, t=1.0, grad_norm=math.nan, values={"loss": -math.inf}))
    assert b'"grad_norm":NaN' in line and b'"loss":-Infinity' in line
    back = decode_line(line)
    assert isinstance(back, StepRecord) and math.isnan(back.grad_norm or 0.0) and back.values == {"loss": -math.inf}


def test_the_ack_marker_matches_how_ack_lines_are_encoded() -> None:
    from gradwatch.spool.reader import ACK_MARKER

    assert encode(EXAMPLES[3]).startswith(b"{" + ACK_MARKER)


@pytest.mark.parametrize("obj, reason", [
    ([1, 2], "not a JSON object"),
    ({"step": 1, "t": 1.0}, "'kind' missing"),
    ({"kind": "step", "t": 1.0}, "'step' missing"),
    ({"kind": "step", "step": True, "t": 1.0}, "'step' missing"),  # a bool is not a step count
    ({"kind": "step", "step": 2**64, "t": 1.0}, "'step' missing"),  # does not fit 64 bits
    ({"kind": "step", "step": 1, "t": math.inf}, "'t' missing"),
    ({"kind": "step", "step": 1, "t": "now"}, "'t' missing"),
    ({"kind": "ack", "step": 1, "t": 1.0, "id": "x", "status": "maybe"}, "ack status 'maybe'"),
    ({"kind": "ack", "step": 1, "t": 1.0, "status": "applied"}, "without a command 'id'"),
])
def test_a_record_no_reader_could_use_is_rejected_with_the_field(obj: object, reason: str) -> None:
    with pytest.raises(RecordError, match=reason) as info:
        decode(obj)
    assert info.value.reason == "invalid"


def test_a_line_that_is_not_json_is_malformed() -> None:
    with pytest.raises(RecordError) as info:
        decode_line(b'{"kind":"step",')
    assert info.value.reason == "malformed"


def test_odd_optional_fields_are_coerced_and_the_rest_of_the_record_kept() -> None:
    obj = {"kind": "step", "step": 3, "t": 1.0, "grad_norm": "big", "lr": [0.1, "x", True, 2], "dur": True,
           "wait": 10**400, "values": {"loss": 1, "flag": False, "": 2.0, "name": "text", "x" * 500: 1.0},
           "clipped": "yes", "skip": "s" * 100, "cuda_mem": {"allocated": "a", "total": 8}, "seq": -1,
           "dropped": "many"}
    record = decode(obj)
    assert isinstance(record, StepRecord)
    assert record.grad_norm is None and record.lr == [0.1, 2.0] and record.dur is None and record.wait == math.inf
    assert record.values == {"loss": 1.0, "x" * rec.MAX_NAME: 1.0}
    assert record.clipped is False and record.skip == "s" * 40
    assert record.cuda_mem == CudaMemory(total=8.0) and record.seq == 0 and record.dropped == 0


def test_large_collections_and_texts_are_bounded() -> None:
    obj = {"kind": "log", "step": 1, "t": 1.0, "values": {f"m{i}": 1.0 for i in range(10_000)}}
    record = decode(obj)
    assert isinstance(record, LogRecord) and len(record.values) == rec.MAX_VALUES
    end = decode({"kind": "end", "step": 1, "t": 1.0, "status": "failed", "error": "e" * 100_000})
    assert isinstance(end, EndRecord) and len(end.error or "") == rec.MAX_TEXT


def test_an_end_with_an_unknown_status_counts_as_failed() -> None:
    end = decode({"kind": "end", "step": 4, "t": 1.0, "status": "exploded"})
    assert isinstance(end, EndRecord) and end.status is EndStatus.FAILED


def test_a_step_and_the_log_record_behind_it_read_as_one_step() -> None:
    step = StepRecord(step=4, t=1.0, grad_norm=1.0)
    merged = merge_logged([step, LogRecord(step=4, t=1.0, values={"loss": 0.5}),
                           LogRecord(step=4, t=1.1, values={"acc": 0.9}), LogRecord(step=3, t=1.2, values={"x": 1})])
    assert len(merged) == 2 and isinstance(merged[0], StepRecord)
    assert merged[0].values == {"loss": 0.5, "acc": 0.9}
    assert merged[1] == LogRecord(step=3, t=1.2, values={"x": 1.0})  # another step's: kept as it is


def test_commands_round_trip_and_bad_ones_name_the_field() -> None:
    command = CommandRecord(id="cut@5", action={"type": "reduce_lr", "factor": 0.5}, apply_at_step=9, trigger_step=5,
                            rule="cut", reason="spike", t=3.0)
    assert decode_command(json.loads(encode_command(command))) == command
    with pytest.raises(RecordError, match="'action' must be an object"):
        decode_command({"id": "x", "action": "stop"})
    with pytest.raises(RecordError, match="'apply_at_step'"):
        decode_command({"id": "x", "action": {"type": "stop"}, "apply_at_step": "soon"})


def test_metadata_round_trips_and_requires_run_rank_and_world_size() -> None:
    meta = RunMeta(run="r", rank=1, world_size=2, host="h", pid=42, labels={"team": "x"}, rules={"rules": []},
                   gpu_uuids=["8f3c2a10-1b2c-4d5e-8f90-0123456789ab"], pid_namespace="pid:[4026531836]")
    assert decode_meta(json.loads(json.dumps(meta_to_json(meta)))) == meta
    hostile = decode_meta({"run": "r", "rank": 0, "world_size": 1, "gpu_uuids": ["u" * 500, 7, None] + ["x"] * 100,
                           "pid_namespace": {"no": "string"}})
    assert hostile.gpu_uuids[0] == "u" * 80 and len(hostile.gpu_uuids) == 62 and hostile.pid_namespace == ""
    assert decode_meta({"run": "r", "rank": 0, "world_size": 1, "gpu_uuids": "GPU-x"}).gpu_uuids == []
    with pytest.raises(RecordError, match="'world_size'"):
        decode_meta({"run": "r", "rank": 0})
    with pytest.raises(RecordError, match="out of range"):
        decode_meta({"run": "r", "rank": -1, "world_size": 2})


@pytest.mark.parametrize(("given", "kept"), [("1", "1"), ("generator", "generator"), ("0", ""), (None, ""),
                                             ("x" * 41, "x" * 40), ('a"}{', ""), (3, "")])
def test_a_step_records_optimizer_name_is_a_short_label_value_or_the_first(given: object, kept: str) -> None:
    record = decode_line(json.dumps({"kind": "step", "step": 1, "t": 1.0, "opt": given}))
    assert isinstance(record, StepRecord) and record.opt == kept
    assert ("opt" in json.loads(encode(record))) == bool(kept)
