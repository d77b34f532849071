"""Several optimizers stepping in turn (a DCGAN-shaped loop): each optimizer has its own step records, its
gradient norm over its own parameters only (not mixed with the other network's stale gradients), and under
``gradwatch run`` the loss of the backward passes that preceded its own step (errD, then errG)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SUPPORT
from tests.spool_records import run_records
from tests.user_scripts.helpers import run_user_script

SCRIPT = SUPPORT / "user_scripts" / "gan.py"


def _each_network_on_its_own(home: Path, run: str, out: Path, steps: int) -> tuple[list[Any], list[Any], Any]:
    """The discriminator's and the generator's step records, checked against the script's reference: every step
    of each, each norm over its own network (before any clip), the discriminator's loss errD."""
    reference = json.loads((out / "reference.json").read_text())
    records = [r for r in run_records(home, run) if r["kind"] == "step"]
    discriminator = [r for r in records if "opt" not in r]
    generator = [r for r in records if r.get("opt") == "1"]
    assert [r["step"] for r in discriminator] == [r["step"] for r in generator] == list(range(1, steps + 1))
    assert [r["grad_norm"] for r in discriminator] == pytest.approx(reference["d_norm"], rel=1e-5)
    assert [r["grad_norm"] for r in generator] == pytest.approx(reference["g_norm"], rel=1e-5)
    assert [r["values"]["loss"] for r in discriminator] == pytest.approx(reference["errD"], rel=1e-5)
    return discriminator, generator, reference


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("mode", ["gradwatch-run", "attach"])
def test_each_optimizer_of_a_gan_has_its_own_norm_loss_and_steps(mode: str, clip: bool, isolated_home: Path,
                                                                tmp_path: Path) -> None:
    """With ``clip``, each network is clipped right before its own step: each norm is still its own, before its
    clip, never one taken at the other network's clip and left over."""
    run_user_script(SCRIPT, [str(tmp_path / "out"), "--steps", "30", *(["--clip"] if clip else [])], mode,
                    isolated_home, "gan")
    discriminator, generator, reference = _each_network_on_its_own(isolated_home, "gan", tmp_path / "out", 30)
    steps = discriminator + generator
    if mode == "gradwatch-run":  # the backward passes before each optimizer's own step
        assert [r["values"]["loss"] for r in generator] == pytest.approx(reference["errG"], rel=1e-5)
    else:
        assert [r["values"]["loss_G"] for r in discriminator] == pytest.approx(reference["errG"], rel=1e-5)
    assert all(len(r["lr"]) == 1 and r["lr"][0] == pytest.approx(2e-4) for r in steps)


def test_a_lightning_gan_with_manual_optimization_records_both_optimizers(isolated_home: Path,
                                                                         tmp_path: Path) -> None:
    """Lightning's manual optimization (training_step steps both optimizers, with manual_backward): every step of
    both is recorded, each with its own norm and the loss of the manual_backward before it."""
    run_user_script(SUPPORT / "user_scripts" / "lightning_gan.py", [str(tmp_path / "out"), "--steps", "20"],
                    "own-callback", isolated_home, "lightning-gan")
    discriminator, generator, reference = _each_network_on_its_own(isolated_home, "lightning-gan",
                                                                   tmp_path / "out", 20)
    assert [r["values"]["loss"] for r in generator] == pytest.approx(reference["errG"], rel=1e-5)
    assert [r["lr"] for r in discriminator[:1] + generator[:1]] == [[2e-4], [1e-4]]


CUT_THE_GENERATOR = """
rules:
  - name: cut-g
    metric: loss
    optimizer: "1"
    detect: {type: threshold, above: 0}
    action: {type: reduce_lr, factor: 0.5}
    mode: act
    max_actions: 1
"""


def test_a_rule_on_the_second_optimizer_watches_its_series_and_cuts_only_its_lr(
        agent_process: Any, isolated_home: Path, tmp_path: Path) -> None:
    agent_process()
    rules = tmp_path / "rules.yaml"
    rules.write_text(CUT_THE_GENERATOR)
    done = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--home", str(isolated_home), "--run", "gan",
                           "--rules", str(rules), "--", sys.executable, str(SCRIPT), str(tmp_path / "out"),
                           "--steps", "150", "--sleep", "0.02"],
                          env={**os.environ, "GRADWATCH_AUTOSTART": "0"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    records = run_records(isolated_home, "gan")
    [ack] = [r for r in records if r["kind"] == "ack"]
    assert ack["status"] == "applied" and ack["id"].startswith("cut-g@") and ack["step"] < 140
    steps = [r for r in records if r["kind"] == "step"]
    generator = {r["step"]: r["lr"][0] for r in steps if r.get("opt") == "1"}
    discriminator = {r["step"]: r["lr"][0] for r in steps if "opt" not in r}
    assert list(discriminator.values()) == pytest.approx([2e-4] * 150), "the discriminator's LR is not cut"
    assert generator[1] == pytest.approx(2e-4) and generator[150] == pytest.approx(1e-4), "the generator's is halved"
