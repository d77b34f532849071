"""Gradients sharded without DTensor (FSDP1, DeepSpeed ZeRO, Megatron's tensor parallelism; issue 17). Each rank
holds a shard, so a norm over one rank's gradients is its shard's, and guards acting on it clip every rank by its
own coefficient. ``attach(shard_group=...)`` reduces the norm over the ranks; sharding the probe recognises without
it is said once, with no norm recorded and no guard acting."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradwatch
from tests.conftest import SUPPORT
from tests.spool_records import run_records

SCRIPT = SUPPORT / "user_scripts" / "sharded_by_hand.py"


def _run(home: Path, out: Path, *flags: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
               str(out), *flags]
    env = {**os.environ, "GRADWATCH_HOME": str(home), "GRADWATCH_AUTOSTART": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.integration
def test_with_the_shard_group_each_rank_records_the_models_norm_and_clips_alike(isolated_home: Path,
                                                                               tmp_path: Path) -> None:
    _run(isolated_home, tmp_path, "--shard-group", "--clip", "0.05")
    for rank in (0, 1):
        reference = json.loads((tmp_path / f"reference-{rank}.json").read_text())
        steps = [r for r in run_records(isolated_home, "sharded", rank) if r["kind"] == "step"]
        assert [r["grad_norm"] for r in steps] == pytest.approx(reference["grad_norm"], rel=1e-5)
        # every rank scaled its own shard by the model's coefficient, not one computed from its shard
        expected = [min(1.0, 0.05 / (n + 1e-6)) for n in reference["grad_norm"]]
        assert reference["factor"] == pytest.approx(expected, rel=1e-4)
        assert all(r["clip"] == 0.05 for r in steps) and any(r["clipped"] for r in steps)


@pytest.mark.integration
def test_without_it_a_rank_records_its_shards_norm(isolated_home: Path, tmp_path: Path) -> None:
    """What the group is for: sharded by hand, nothing marks the gradients, and each rank's norm is its shard's."""
    _run(isolated_home, tmp_path)
    for rank in (0, 1):
        reference = json.loads((tmp_path / f"reference-{rank}.json").read_text())["grad_norm"]
        steps = [r for r in run_records(isolated_home, "sharded", rank) if r["kind"] == "step"]
        assert all(r["grad_norm"] < n * (1 - 1e-3) for r, n in zip(steps, reference, strict=True))


class FullyShardedDataParallel(torch.nn.Module):
    """A stand-in with FSDP1's class name: FSDP1 cannot run here ("FSDP needs a non-CPU accelerator device"). The
    probe recognises the wrapper by that name, as it would the real one."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _megatron_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    model[0].weight.tensor_model_parallel = True  # type: ignore[assignment]  # what Megatron marks its shards with
    return model


@pytest.mark.parametrize("make, named", [
    (lambda: FullyShardedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))),
     "FSDP (FullyShardedDataParallel)"),
    (_megatron_model, "Megatron tensor parallelism"),
])
def test_recognised_sharding_without_a_group_records_no_norm_and_no_guard_acts(
        make: object, named: str, isolated_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gradwatch")
    model = make()  # type: ignore[operator]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rules = {"guards": {"clip": {"scheme": "fixed", "max_norm": 1e-6}}}  # would clip every step
    with gradwatch.attach(model, opt, run="shards", rules=rules) as probe:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 4)).pow(2).sum().backward()
            before = [p.grad.clone() for p in model.parameters()]
            opt.step()
            assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))
            probe.log(loss=1.5)
    steps = [r for r in run_records(isolated_home, "shards") if r["kind"] == "step"]
    assert len(steps) == 3 and all(r["grad_norm"] is None and "clipped" not in r for r in steps)
    assert all(r["values"]["loss"] == 1.5 for r in steps)
    said = [r.getMessage() for r in caplog.records if "sharded" in r.getMessage()]
    assert len(said) == 1 and named in said[0] and "shard_group=" in said[0]


def test_a_shard_group_needs_torch_distributed(isolated_home: Path) -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="init_process_group before attach"):
        gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), shard_group="world")


def test_a_bad_shard_group_in_the_environment_is_said_and_ignored(isolated_home: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Under ``gradwatch run`` a mistake in the environment never stops the training."""
    monkeypatch.setenv("GRADWATCH_SHARD_GROUP", "tensor-parallel")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.attach(model, opt, run="env"):
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
    assert any("GRADWATCH_SHARD_GROUP='tensor-parallel' ignored" in r.getMessage() for r in caplog.records)
    steps = [r for r in run_records(isolated_home, "env") if r["kind"] == "step"]
    assert steps[0]["grad_norm"] == pytest.approx(math.sqrt(3))  # recorded as without sharding


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP1 needs an accelerator, two ranks two GPUs; this "
                    f"machine has {torch.cuda.device_count()} (no GPU was lent to this task)")
def test_fsdp1_with_its_process_group_records_the_norm_fsdp_clips_by(isolated_home: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(SUPPORT / "user_scripts" / "fsdp1.py"), str(tmp_path)]
    env = {**os.environ, "GRADWATCH_HOME": str(isolated_home), "GRADWATCH_AUTOSTART": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        reference = json.loads((tmp_path / f"reference-{rank}.json").read_text())["grad_norm"]
        steps = [r for r in run_records(isolated_home, "fsdp1", rank) if r["kind"] == "step"]
        assert [r["grad_norm"] for r in steps] == pytest.approx(reference, rel=1e-4)
