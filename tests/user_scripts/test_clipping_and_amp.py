"""The recorded gradient norm is the one before the script's own clipping, in the usual set-ups and in
both ways of attaching; the script's threshold and which steps it clipped are recorded; steps that
GradScaler skips are recorded as skipped, with their non-finite norm and the scale that overflowed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SUPPORT
from tests.spool_records import run_records

SETUPS = SUPPORT / "setups_script.py"
MODES = ["attach", "gradwatch-run"]


def run_setup(home: Path, out: Path, setup: str, mode: str, *flags: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    command = [sys.executable, str(SETUPS), setup, str(out), *flags]
    if mode == "attach":
        command.append("--attach")
    else:
        command = [sys.executable, "-m", "gradwatch", "run", "--home", str(home), "--run", setup, "--", *command]
    env = {**os.environ, "GRADWATCH_HOME": str(home), "GRADWATCH_AUTOSTART": "0", "GRADWATCH_RUN": setup,
           "GRADWATCH_LAYER_STATS_EVERY": "3"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    reference: dict[str, Any] = json.loads((out / "reference-0.json").read_text())
    steps = [r for r in run_records(home, setup) if r["kind"] == "step" and "opt" not in r]  # the first optimizer's
    assert [r["step"] for r in steps] == list(range(1, len(reference["grad_norm"]) + 1))
    return steps, reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setup", ["fp32", "amp", "accumulate", "multi-opt"])
def test_the_norm_before_the_scripts_clip_grad_norm_and_its_threshold(setup: str, mode: str, isolated_home: Path,
                                                                      tmp_path: Path) -> None:
    steps, reference = run_setup(isolated_home, tmp_path / "out", setup, mode, "--clip")
    assert [r["values"]["loss"] for r in steps] == pytest.approx(reference["loss"], rel=1e-5)
    assert any(reference["clipped"])  # the check is not vacuous: these norms are above 0.5
    if setup == "multi-opt":  # each optimizer's own norm, before the clip over both; the clip covered more
        # under gradwatch run the probe starts at the first step, after its clip: that step's norms are clipped
        first = 1 if mode == "gradwatch-run" else 0
        own = reference["opt_norms"][first:]
        assert [r["grad_norm"] for r in steps][first:] == pytest.approx([n[0] for n in own], rel=1e-5)
        other = [r for r in run_records(isolated_home, setup) if r.get("opt") == "1"]
        assert [r["grad_norm"] for r in other][first:] == pytest.approx([n[1] for n in own], rel=1e-5)
        assert all("clip" not in r for r in steps + other)
    else:
        assert [r["grad_norm"] for r in steps] == pytest.approx(reference["grad_norm"], rel=1e-5)
        assert all(r["clip"] == 0.5 for r in steps)
        assert [r["clipped"] for r in steps] == reference["clipped"]
        assert max(r["grad_norm"] for r in steps) > 0.5 + 1e-3  # a spike stays visible, not flattened to max_norm
    assert_layer_norms_before_the_clip(isolated_home, setup, steps, reference)


def assert_layer_norms_before_the_clip(home: Path, run: str, steps: list[dict[str, Any]],
                                       reference: dict[str, Any]) -> None:
    """The per-layer norms of each sampled step are those of the gradients the global norm measured: before the
    script's clipping (measured after it, they would combine to the clip threshold wherever it clipped)."""
    layers = [r for r in run_records(home, run) if r["kind"] == "layers"]
    norm_at = {i + 1: n for i, n in enumerate(reference["grad_norm"])}  # every parameter the layers cover
    assert len(layers) >= 3
    combined = [math.sqrt(sum(n * n for n in r["grad_norm"])) for r in layers]
    assert combined == pytest.approx([norm_at[r["step"]] for r in layers], rel=1e-5)
    clipped_at = {i + 1 for i, c in enumerate(reference["clipped"]) if c}
    assert not clipped_at or {r["step"] for r in layers} & clipped_at, "no sampled step was clipped: vacuous"


@pytest.mark.parametrize("mode", MODES)
def test_the_norm_before_the_scripts_clip_grad_value(mode: str, isolated_home: Path, tmp_path: Path) -> None:
    steps, reference = run_setup(isolated_home, tmp_path / "out", "fp32", mode, "--clip-value")
    assert [r["grad_norm"] for r in steps] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert all("clip" not in r for r in steps)  # a value clamp has no norm threshold to report
    assert_layer_norms_before_the_clip(isolated_home, "fp32", steps, reference)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad_step", [1, 4])  # 1: before any optimizer step ran (fp16 runs often start so)
def test_a_step_gradscaler_skips_is_recorded_as_skipped(bad_step: int, mode: str, isolated_home: Path,
                                                        tmp_path: Path) -> None:
    steps, reference = run_setup(isolated_home, tmp_path / "out", "amp", mode, "--clip", "--nan-at", str(bad_step))
    skipped = [i + 1 for i, scale in enumerate(reference["skipped_scale"]) if scale is not None]
    assert skipped == [bad_step]  # the reference agrees GradScaler skipped that step, and only it
    record = steps[bad_step - 1]
    assert record["skip"] == "amp" and math.isnan(record["grad_norm"]) and record["loss_scale"] == 1024.0
    assert all("skip" not in r for r in steps if r["step"] != bad_step)
    assert [r["grad_norm"] for r in steps] == pytest.approx(reference["grad_norm"], rel=1e-5, nan_ok=True)


@pytest.mark.parametrize("mode", MODES)
def test_iterations_gradscaler_skips_keep_their_own_loss(mode: str, isolated_home: Path, tmp_path: Path) -> None:
    """Iterations whose scaled gradients overflow (finite losses, inf gradients), the first two among them: each
    skipped iteration is its own record with its own loss, and the next step's loss is that step's only (not the
    sum with the skipped ones: no false spike)."""
    steps, reference = run_setup(isolated_home, tmp_path / "out", "amp", mode, "--overflow-at", "1,2,6")
    skipped = [i + 1 for i, scale in enumerate(reference["skipped_scale"]) if scale is not None]
    assert skipped == [1, 2, 6]
    assert [r["step"] for r in steps if r.get("skip") == "amp"] == skipped
    assert [r["values"]["loss"] for r in steps] == pytest.approx(reference["loss"], rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_micro_batch_losses_add_up_in_float32(mode: str, isolated_home: Path, tmp_path: Path) -> None:
    steps, reference = run_setup(isolated_home, tmp_path / "out", "accumulate", mode, "--bf16-loss")
    assert [r["values"]["loss"] for r in steps] == pytest.approx(reference["loss"], rel=1e-6)
