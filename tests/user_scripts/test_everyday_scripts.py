"""Scripts written the way people write them, run under ``gradwatch.attach`` and under ``gradwatch run``:
nothing gradwatch puts on the model breaks copying or saving it, scripts without an optimizer are
recorded, and the recorded gradient norm is the one before the script's own clipping.

Each script (tests/support/user_scripts) writes its own reference: torch's ``clip_grad_norm_`` result or
``get_total_norm`` of each update, and the loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradwatch.spool.format import SpoolLayout
from tests.conftest import SUPPORT
from tests.spool_records import run_records

SCRIPTS = SUPPORT / "user_scripts"
MODES = ["attach", "gradwatch-run"]

#: name -> (script, its arguments, max_norm of the script's clip_grad_norm_ or None, steps by hand)
SHAPES: dict[str, tuple[str, tuple[str, ...], float | None, bool]] = {
    "rnn-lm-by-hand": ("rnn_lm.py", ("--optimizer", "by-hand"), 0.12, True),
    "rnn-lm-adamw": ("rnn_lm.py", ("--optimizer", "adamw"), 0.12, False),
    "regression": ("regression.py", (), None, True),
    "lbfgs": ("lbfgs.py", (), None, False),
    "ema": ("averaging.py", ("ema",), 1.0, False),
    "swa": ("averaging.py", ("swa",), 1.0, False),
}


#: samples in each training forward pass of each shape
SAMPLES = {"rnn-lm-by-hand": 10, "rnn-lm-adamw": 10, "regression": 32, "lbfgs": 64, "ema": 16, "swa": 16}


def run_script(home: Path, out: Path, shape: str, mode: str) -> dict[str, Any]:
    script, args, _, _ = SHAPES[shape]
    command = [sys.executable, str(SCRIPTS / script), str(out), *args]
    env = {**os.environ, "GRADWATCH_HOME": str(home), "GRADWATCH_AUTOSTART": "0", "GRADWATCH_RUN": shape}
    if mode == "attach":
        command.append("--attach")
    else:
        command = [sys.executable, "-m", "gradwatch", "run", "--home", str(home), "--run", shape, "--", *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    reference: dict[str, Any] = json.loads((out / "reference.json").read_text())
    return reference


def loads_without_gradwatch(path: str) -> subprocess.CompletedProcess[str]:
    """Load a whole-model file in a process where gradwatch cannot be imported, and run it forward."""
    code = ("import sys, torch\nsys.modules['gradwatch'] = None\n"
            "sys.path.insert(0, '.')\n"  # the model's own module (lm_model.py), as with the example's model.py
            f"model = torch.load({path!r}, weights_only=False)\nmodel.eval()\n"
            "inner = getattr(model, 'module', model)\n"
            "first = next(m for m in inner.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))\n"
            "x = torch.randint(0, 50, (4, 2)) if isinstance(first, torch.nn.Embedding) else torch.randn(4, first.in_features)\n"
            "out = model(x, model.init_hidden(2)) if hasattr(model, 'init_hidden') else model(x)\n"
            "print('loaded', type(model).__name__)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=SCRIPTS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_everyday_script_runs_and_records_what_torch_computes(shape: str, mode: str, isolated_home: Path,
                                                               tmp_path: Path) -> None:
    reference = run_script(isolated_home, tmp_path / "out", shape, mode)
    _, _, max_norm, by_hand = SHAPES[shape]
    records = run_records(isolated_home, shape)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, len(reference["grad_norm"]) + 1))
    assert [r["grad_norm"] for r in steps] == pytest.approx(reference["grad_norm"], rel=1e-5)  # before clipping
    assert [r["values"]["loss"] for r in steps] == pytest.approx(reference["loss"], rel=1e-5)
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "finished"
    meta = json.loads(SpoolLayout.meta_file(SpoolLayout(isolated_home).run_dir(shape), 0).read_text())
    if by_hand:  # no optimizer: every backward pass is a step, and there is no learning rate
        assert meta["steps_from"] == "backward" and all(r["lr"] == [] for r in steps)
    else:
        assert meta["steps_from"] == "optimizer" and all(r["lr"] for r in steps)
    if max_norm is not None and not by_hand:  # the script's own threshold, and which steps it clipped
        assert all(r["clip"] == max_norm for r in steps)
        assert [r["clipped"] for r in steps] == [n + 1e-6 > max_norm for n in reference["grad_norm"]]
        assert any(r["clipped"] for r in steps) or shape in ("ema", "swa")
    if mode == "gradwatch-run":  # samples per step from the model's inputs (rnn_lm's LSTM takes (seq, batch)),
        # from the second step: the model is found at the first one (LBFGS calls it inside that step)
        assert ("batch_size" in steps[0]["values"]) == (shape == "lbfgs")
        samples = [r["values"].get("batch_size") for r in steps[1:]]
        per_forward = SAMPLES[shape]
        assert all(n is not None and n % per_forward == 0 for n in samples), samples
        if shape != "lbfgs":  # LBFGS evaluates its closure (a forward pass) several times per step
            assert set(samples) == {per_forward}
    if shape.startswith("rnn-lm"):  # gradwatch.log(val_loss=...) after each epoch, with or without attach
        val = [r for r in records if "val_loss" in r.get("values", {})]
        assert len(val) == 3 and [r["step"] for r in val] == [7, 14, 21]
    if "saved" in reference:  # the whole model, saved under gradwatch, loads where gradwatch is not installed
        assert b"gradwatch" not in Path(reference["saved"]).read_bytes()
        loaded = loads_without_gradwatch(reference["saved"])
        assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr


def test_gradwatch_log_does_nothing_without_a_probe(tmp_path: Path) -> None:
    """The same script, plainly run: its ``gradwatch.log(val_loss=...)`` line is a no-op, nothing is written."""
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, str(SCRIPTS / "rnn_lm.py"), str(tmp_path / "out"), "--epochs", "1"],
                          env={**os.environ, "GRADWATCH_HOME": str(home), "GRADWATCH_AUTOSTART": "0"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert not home.exists()
