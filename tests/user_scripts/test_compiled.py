"""A ``torch.compile``d model under ``gradwatch run`` compiles exactly as often as without gradwatch (torch's
own dynamo counters), trains the same, gets no warning about global hooks, and is still recorded (loss,
clip, LR, and from the second step the data wait and samples from the model's hook)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SUPPORT
from tests.spool_records import run_records

SCRIPT = SUPPORT / "user_scripts" / "compiled.py"


def _compile_counts(out: Path, *prefix: str, env: dict[str, str]) -> tuple[dict[str, object], str]:
    done = subprocess.run([*prefix, sys.executable, str(SCRIPT), str(out), "--steps", "8"], capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "compile.json").read_text()), done.stderr


def test_a_compiled_model_compiles_as_often_under_gradwatch_run_as_without(isolated_home: Path,
                                                                          tmp_path: Path) -> None:
    plain, _ = _compile_counts(tmp_path / "plain", env={"GRADWATCH_AUTOSTART": "0"})
    watched, stderr = _compile_counts(tmp_path / "watched", sys.executable, "-m", "gradwatch", "run", "--home",
                                      str(isolated_home), "--run", "compiled", "--",
                                      env={"GRADWATCH_AUTOSTART": "0"})
    assert plain["unique_graphs"] == 1  # the check is not vacuous: the model is compiled, in one graph
    for counter in ("frames_ok", "unique_graphs", "recompiles"):
        assert watched[counter] == plain[counter], counter
    assert watched["counters"] == plain["counters"]
    assert watched["loss"] == plain["loss"], "training is unchanged"
    assert "global hooks" not in stderr
    steps = [r for r in run_records(isolated_home, "compiled") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["values"]["loss"] for r in steps] == pytest.approx(plain["loss"], rel=1e-6)
    assert all(r["clip"] == 1.0 for r in steps)
    assert all(r["values"]["batch_size"] == 4 and r["wait"] is not None for r in steps[1:])
