"""Per-layer gradient norms see the gradients before the framework clips them, as the global norm does, in
every way of attaching to Lightning and Transformers. Measured after clipping, a clipped step's layer norms
would combine to the clip threshold instead of the recorded (pre-clip) global norm."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from tests.conftest import SUPPORT
from tests.frameworks.helpers import records, run_script

CLIP = 0.05  # below every step's norm in these scripts: each sampled step is clipped


def assert_layers_before_the_clip(home: Path, run: str) -> None:
    steps = {r["step"]: r for r in records(home, run)}
    layers = records(home, run, kind="layers")
    assert len(layers) >= 2
    for record in layers:
        step = steps[record["step"]]
        assert step["grad_norm"] > CLIP and step["clipped"], "the sampled step was clipped (else vacuous)"
        combined = math.sqrt(sum(n * n for n in record["grad_norm"]))
        assert combined == pytest.approx(step["grad_norm"], rel=1e-5), f"step {record['step']}"


@pytest.mark.parametrize("attached", ["callback", "gradwatch-run"])
def test_lightning_layer_norms_are_before_its_gradient_clipping(attached: str, isolated_home: Path,
                                                               tmp_path: Path) -> None:
    script = [str(SUPPORT / "lightning_script.py"), str(tmp_path), "--steps", "30", "--clip-val", str(CLIP)]
    if attached == "callback":
        run_script("lightning_script.py", isolated_home, *script[1:])
        assert_layers_before_the_clip(isolated_home, "lightning")
    else:
        run_script("-m", isolated_home, "gradwatch", "run", "--run", "plain-lightning", "--", sys.executable,
                   *script, "--no-callback", env={"GRADWATCH_LAYER_STATS_EVERY": "10"})
        assert_layers_before_the_clip(isolated_home, "plain-lightning")


def test_transformers_layer_norms_are_before_the_trainers_gradient_clipping(isolated_home: Path,
                                                                          tmp_path: Path) -> None:
    run_script("hf_script.py", isolated_home, str(tmp_path), "--steps", "20", "--max-grad-norm", str(CLIP))
    assert_layers_before_the_clip(isolated_home, "hf")
