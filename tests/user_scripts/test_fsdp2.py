"""FSDP2 on CPU (two gloo processes under torchrun), under ``attach`` and ``gradwatch run``: the recorded norm
is the global one the script's ``clip_grad_norm_`` returns, equal on both ranks; without that call the
probe records no norm (and says why once) rather than each rank's local shard norm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SUPPORT
from tests.spool_records import run_records

SCRIPT = SUPPORT / "user_scripts" / "fsdp2.py"


def _run(home: Path, out: Path, mode: str, *flags: str, layer_stats_every: int = 0,
         env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*torchrun, str(SCRIPT), str(out), *flags]
    if mode == "attach":
        command.append("--attach")
    else:
        command = [sys.executable, "-m", "gradwatch", "run", "--home", str(home), "--run", "fsdp2", "--", *command]
    env = {**os.environ, "GRADWATCH_HOME": str(home), "GRADWATCH_AUTOSTART": "0", "GRADWATCH_RUN": "fsdp2",
           "GRADWATCH_LAYER_STATS_EVERY": str(layer_stats_every), **(env_extra or {})}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["attach", "gradwatch-run"])
def test_the_global_norm_from_the_scripts_clip_on_every_rank(mode: str, isolated_home: Path, tmp_path: Path) -> None:
    _run(isolated_home, tmp_path / "out", mode)
    for rank in (0, 1):
        reference = json.loads((tmp_path / "out" / f"reference-{rank}.json").read_text())["grad_norm"]
        steps = [r for r in run_records(isolated_home, "fsdp2", rank) if r["kind"] == "step"]
        assert [r["grad_norm"] for r in steps] == pytest.approx(reference, rel=1e-6)
        assert all(r["clip"] == 0.5 for r in steps)


@pytest.mark.integration
def test_without_a_clip_call_no_norm_rather_than_a_shards(isolated_home: Path, tmp_path: Path) -> None:
    done = _run(isolated_home, tmp_path / "out", "gradwatch-run", "--no-clip")
    for rank in (0, 1):
        steps = [r for r in run_records(isolated_home, "fsdp2", rank) if r["kind"] == "step"]
        assert len(steps) == 6 and all(r["grad_norm"] is None for r in steps)
        assert all(r["values"]["loss"] > 0 for r in steps)  # the rest is still recorded
    assert done.stderr.count("the gradients are sharded (FSDP2/DTensor)") == 2  # once per rank


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["attach", "gradwatch-run"])
def test_layer_statistics_of_sharded_gradients_are_the_full_layers(mode: str, isolated_home: Path,
                                                                 tmp_path: Path) -> None:
    """Every step sampled: each layer's gradient norm and update ratio equal those of the full tensors (the
    shards' sums added over the ranks), on both ranks, with no internal error."""
    done = _run(isolated_home, tmp_path / "out", mode, layer_stats_every=1)
    assert "internal error" not in done.stderr
    for rank in (0, 1):
        reference = json.loads((tmp_path / "out" / f"reference-{rank}.json").read_text())
        layers = [r for r in run_records(isolated_home, "fsdp2", rank) if r["kind"] == "layers"]
        # gradwatch run starts the probe inside the first step, after the script's clip: from step 2 on
        assert [r["step"] for r in layers] == list(range(1 if mode == "attach" else 2, 7))
        for record in layers:
            norms, ratios = reference["layer_grad_norm"][record["step"] - 1], reference["update_ratio"][record["step"] - 1]
            assert dict(zip(record["layers"], record["grad_norm"], strict=True)) == pytest.approx(norms, rel=1e-5)
            assert record["update_ratio"] == pytest.approx({k: ratios[k] for k in record["update_ratio"]}, rel=1e-4)


@pytest.mark.integration
def test_with_the_guards_off_every_step_and_loss_is_recorded(isolated_home: Path, tmp_path: Path) -> None:
    """The post-step hook raised on DTensor gradients once no guard ran before it: steps, losses and commands lost."""
    rules = tmp_path / "rules.yml"
    rules.write_text('guards:\n  skip: {on_nonfinite: "off", on_spike: "off"}\n  clip: {scheme: none}\n')
    done = _run(isolated_home, tmp_path / "out", "attach", env_extra={"GRADWATCH_RULES_FILE": str(rules)})
    assert "internal error" not in done.stderr and "invalid rules" not in done.stderr
    for rank in (0, 1):
        reference = json.loads((tmp_path / "out" / f"reference-{rank}.json").read_text())["grad_norm"]
        steps = [r for r in run_records(isolated_home, "fsdp2", rank) if r["kind"] == "step"]
        assert [r["grad_norm"] for r in steps] == pytest.approx(reference, rel=1e-6)
        assert all(r["values"]["loss"] > 0 for r in steps)
