"""Reading what a probe wrote, through the spool's record contract (gradwatch.spool.records): every
line is decoded and validated as the agent decodes it, and the scalars logged after a step are in
that step's record whatever the writer thread's timing. Tests then assert on the lines' objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.reader import read_all_records
from gradwatch.spool.records import merge_logged, to_json


def read_records_file(path: Path) -> list[dict[str, Any]]:
    return [to_json(r) for r in merge_logged(read_all_records(path))]


def run_records(home: Path, run: str, rank: int = 0) -> list[dict[str, Any]]:
    return read_records_file(SpoolLayout.records_file(SpoolLayout(home).run_dir(run), rank))
