"""The spool contract: claiming run directories, metadata versions, tailing record files."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from gradwatch.spool.format import FORMAT_NAME, SpoolLayout, safe_run_name
from gradwatch.spool.reader import SpoolFormatError, read_meta, read_records
from gradwatch.spool.records import LogRecord
from gradwatch.spool.writer import claim_run_dir


def _meta(**overrides: object) -> dict[str, object]:
    return {"format": FORMAT_NAME, "format_version": "1.0", "run": "r", "rank": 0, "world_size": 1, **overrides}


def test_ranks_of_one_launch_share_a_directory_other_launches_get_a_new_one(tmp_path: Path) -> None:
    layout = SpoolLayout(tmp_path)
    results: list[tuple[str, Path]] = []
    threads = [threading.Thread(target=lambda: results.append(claim_run_dir(layout, "exp", "launch-A")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {name for name, _ in results} == {"exp"}
    assert claim_run_dir(layout, "exp", "launch-B")[0] == "exp-2"
    assert claim_run_dir(layout, "exp", "launch-A")[0] == "exp"
    assert claim_run_dir(layout, "exp", "launch-C")[0] == "exp-3"


def test_run_names_are_made_safe_for_paths_and_labels() -> None:
    assert safe_run_name("lr sweep/3e-4") == "lr-sweep-3e-4"
    assert safe_run_name("../../etc") == "etc"
    assert safe_run_name("") == "run"


def test_metadata_of_a_newer_major_version_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.meta.json"
    path.write_text(json.dumps(_meta(format_version="2.0")))
    with pytest.raises(SpoolFormatError, match=r"spool format 2\.0 is newer than this agent understands.*upgrade"):
        read_meta(path)


def test_metadata_of_a_newer_minor_version_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.meta.json"
    path.write_text(json.dumps(_meta(format_version="1.7", future_field=True)))
    assert read_meta(path).run == "r"  # the field it does not know is ignored


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read run metadata"),
    (json.dumps({"format": "other"}), "not gradwatch run metadata"),
    (json.dumps(_meta(format_version="x")), "expected 'MAJOR.MINOR'"),
    (json.dumps(_meta(rank="0")), "field 'rank' missing or not int"),
])
def test_broken_metadata_names_the_file_and_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "rank-0.meta.json"
    path.write_text(content)
    with pytest.raises(SpoolFormatError, match=message) as info:
        read_meta(path)
    assert str(path) in str(info.value)


def test_a_partial_last_line_is_left_for_the_next_read(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.records.jsonl"
    first = b'{"kind":"step","step":1,"t":1.0}\n'
    path.write_bytes(first + b'{"kind":"step","st')
    result = read_records(path, 0)
    assert [r.step for r in result.records] == [1] and result.offset == len(first)
    with open(path, "ab") as f:
        f.write(b'ep":2,"t":2.0}\n')
    result = read_records(path, result.offset)
    assert [r.step for r in result.records] == [2] and result.offset == path.stat().st_size


def test_invalid_lines_are_rejected_with_a_reason_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.records.jsonl"
    path.write_text(
        '{"kind":"step","step":1,"t":1.0}\n'
        "garbage\n"
        '{"kind":7,"step":2,"t":2.0}\n'
        '{"kind":"log","step":-1,"t":2.0}\n'
        '{"kind":"log","step":3,"t":3.0,"values":{"loss":NaN}}\n'
    )
    result = read_records(path, 0)
    assert [r.step for r in result.records] == [1, 3]
    assert result.rejected == ["malformed", "invalid", "invalid"]
    logged = result.records[1]
    assert isinstance(logged, LogRecord) and math.isnan(logged.values["loss"])  # NaN survives the trip


def test_a_record_kind_from_a_newer_minor_version_is_skipped_not_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.records.jsonl"
    path.write_text('{"kind":"teleport","step":2,"t":2.0}\n{"kind":"step","step":3,"t":3.0}\n')
    result = read_records(path, 0)
    assert [r.step for r in result.records] == [3] and result.rejected == []
