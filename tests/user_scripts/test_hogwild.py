"""Hogwild workers (``torch.multiprocessing`` processes without a rank, training one shared model) are one run,
each worker under its own rank label (its index among the parent's children) and named in the metadata,
under ``gradwatch run`` and when each worker attaches its own probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.reader import read_meta
from tests.conftest import SUPPORT
from tests.spool_records import run_records
from tests.user_scripts.helpers import run_user_script

SCRIPT = SUPPORT / "user_scripts" / "hogwild.py"


@pytest.mark.parametrize("mode", ["gradwatch-run", "attach"])
def test_hogwild_workers_are_one_run_labelled_apart(mode: str, isolated_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_user_script(SCRIPT, [str(out), "--workers", "3", "--steps", "25"], mode, isolated_home, "hogwild")
    assert "also claims rank" not in done.stderr
    runs = sorted(p.name for p in SpoolLayout(isolated_home).runs_dir.iterdir() if p.is_dir())
    assert runs == ["hogwild"], "one run, not hogwild, hogwild-2, ..."
    run_dir = SpoolLayout(isolated_home).run_dir("hogwild")
    metas = {r: read_meta(SpoolLayout.meta_file(run_dir, r)) for r in range(3)}
    assert {r: m.worker for r, m in metas.items()} == {0: "Process-1", 1: "Process-2", 2: "Process-3"}
    assert len({m.pid for m in metas.values()}) == 3 and len({m.launch_key for m in metas.values()}) == 1
    for rank in range(3):
        reference = json.loads((out / f"worker-{rank}.json").read_text())
        records = run_records(isolated_home, "hogwild", rank)
        steps = [r for r in records if r["kind"] == "step"]
        assert records[-1]["kind"] == "end" and records[-1]["status"] == "finished", "closed as the worker exits"
        assert [r["step"] for r in steps] == list(range(1, 26))
        assert [r["values"]["loss"] for r in steps] == pytest.approx(reference["loss"], rel=1e-6), f"worker {rank}"


def test_a_hogwild_worker_that_raises_ends_failed_and_the_others_finished(isolated_home: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--home", str(isolated_home), "--run", "hw", "--",
                           sys.executable, str(SCRIPT), str(tmp_path / "out"), "--raise-in", "1"],
                          env={**os.environ, "GRADWATCH_AUTOSTART": "0"}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    ends = [run_records(isolated_home, "hw", rank)[-1] for rank in (0, 1)]
    assert [(e["kind"], e["status"]) for e in ends] == [("end", "finished"), ("end", "failed")]
    assert "worker failed" in ends[1]["error"] and ends[1]["step"] == 5
