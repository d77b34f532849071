"""``gradwatch run -- CMD``: unmodified scripts, watched. Real torch training in real subprocesses;
torchrun with real gloo processes; a real agent where a rule must act."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradwatch.spool.format import SpoolLayout
from tests.conftest import SUPPORT, http_json, wait_until
from tests.spool_records import run_records

SETUPS = SUPPORT / "setups_script.py"
SCRIPT = SUPPORT / "zero_code_script.py"


def gradwatch_run(home: Path, *command: str, options: tuple[str, ...] = (), env: dict[str, str] | None = None,
                  timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradwatch", "run", "--home", str(home), *options, "--", *command],
                          check=False,
                          env={**os.environ, "GRADWATCH_AUTOSTART": "0", **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def step_records(home: Path, run: str, rank: int = 0) -> list[dict[str, Any]]:
    return [r for r in run_records(home, run, rank) if r["kind"] == "step"]


def end_record(home: Path, run: str, rank: int = 0) -> dict[str, Any]:
    return [r for r in run_records(home, run, rank) if r["kind"] == "end"][-1]


def assert_matches_reference(home: Path, out: Path, run: str, rank: int = 0, steps: int = 12) -> list[dict[str, Any]]:
    """The first optimizer's records against the script's reference: with several optimizers, each one's norm
    is over its own parameters (the others' records: ``opt`` "1", ...)."""
    reference = json.loads((out / f"reference-{rank}.json").read_text())
    records = [r for r in step_records(home, run, rank) if "opt" not in r]
    several = len(reference["opt_norms"][0]) > 1
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    expected = [n[0] for n in reference["opt_norms"]] if several else reference["grad_norm"]
    assert [r["grad_norm"] for r in records] == pytest.approx(expected, rel=1e-5)
    assert [r["values"]["loss"] for r in records] == pytest.approx(reference["loss"], rel=1e-5)
    return records


# -- the gradient norm equals torch's clip_grad_norm_ in each usual set-up -------------------------
@pytest.mark.parametrize("setup", ["fp32", "amp", "amp-fused", "accumulate", "multi-opt"])
def test_grad_norm_and_loss_equal_torchs_in_each_setup(setup: str, isolated_home: Path, tmp_path: Path) -> None:
    """fp32; AMP with GradScaler, unscaled by the script (amp) or handed scaled to a fused optimizer
    (amp-fused); 4 micro-batches per step (the norm at the optimizer step, the loss their sum); two
    optimizers with three param groups (each its own records: norm over its parameters, its LRs, and the
    loss of the one backward pass before both)."""
    done = gradwatch_run(isolated_home, sys.executable, str(SETUPS), setup, str(tmp_path / "out"),
                         options=("--run", setup))
    assert done.returncode == 0, done.stderr
    records = assert_matches_reference(isolated_home, tmp_path / "out", setup)
    if setup == "multi-opt":
        assert records[0]["lr"] == [0.05, 0.01]  # SGD's two groups; Adam's in its own records
        reference = json.loads((tmp_path / "out" / "reference-0.json").read_text())
        adam = [r for r in step_records(isolated_home, setup) if r.get("opt") == "1"]
        assert [r["step"] for r in adam] == list(range(1, 13)) and all(r["lr"] == [0.001] for r in adam)
        assert [r["grad_norm"] for r in adam] == pytest.approx([n[1] for n in reference["opt_norms"]], rel=1e-5)
        assert [r["values"]["loss"] for r in adam] == pytest.approx(reference["loss"], rel=1e-5)


@pytest.mark.parametrize("setup", ["fp32", "amp"])
def test_the_scripts_own_clip_grad_norm_result_is_recorded_before_clipping(setup: str, isolated_home: Path,
                                                                           tmp_path: Path) -> None:
    done = gradwatch_run(isolated_home, sys.executable, str(SETUPS), setup, str(tmp_path / "out"), "--clip",
                         options=("--run", setup))
    assert done.returncode == 0, done.stderr
    records = assert_matches_reference(isolated_home, tmp_path / "out", setup)
    assert all(r["grad_norm"] > 0.5 for r in records)  # the norm before the script clipped to 0.5


def test_torchrun_ddp_every_rank_records_the_global_norm(isolated_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = gradwatch_run(isolated_home, sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc-per-node", "2", str(SETUPS), "ddp", str(out), options=("--run", "ddp"))
    assert done.returncode == 0, done.stderr
    meta = [json.loads(SpoolLayout.meta_file(SpoolLayout(isolated_home).run_dir("ddp"), r).read_text())
            for r in (0, 1)]
    assert [(m["rank"], m["world_size"]) for m in meta] == [(0, 2), (1, 2)]
    norms = [[r["grad_norm"] for r in assert_matches_reference(isolated_home, out, "ddp", rank)] for rank in (0, 1)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)  # DDP averaged the gradients: one global norm


# -- the launcher -----------------------------------------------------------------------------------
def test_the_scripts_exit_status_is_passed_through(isolated_home: Path, tmp_path: Path) -> None:
    done = gradwatch_run(isolated_home, sys.executable, str(SCRIPT), str(tmp_path), "--exit-code", "3",
                         options=("--run", "exit3"))
    assert done.returncode == 3
    assert len(step_records(isolated_home, "exit3")) == 20
    killed = gradwatch_run(isolated_home, sys.executable, str(SCRIPT), str(tmp_path), "--kill-self",
                           options=("--run", "killed"))
    assert killed.returncode == 128 + signal.SIGTERM


def test_a_missing_command_or_bad_rules_file_is_one_line_and_nothing_runs(isolated_home: Path,
                                                                           tmp_path: Path) -> None:
    missing = gradwatch_run(isolated_home, "no-such-trainer-xyz")
    assert missing.returncode == 127
    assert missing.stderr.strip().splitlines()[-1] == (
        "gradwatch: error: command not found: 'no-such-trainer-xyz' (check the spelling and your PATH)")
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: x\n    metric: loss\n    detect: {type: nope}\n    action: {type: stop}\n")
    refused = gradwatch_run(isolated_home, sys.executable, str(SCRIPT), str(tmp_path / "never"),
                            options=("--rules", str(bad)))
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr and str(bad) in refused.stderr and "nope" in refused.stderr
    assert not (tmp_path / "never").exists()


def test_the_users_own_sitecustomize_still_runs(isolated_home: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE'] = 'ran'\n")
    probe = tmp_path / "probe.py"
    probe.write_text("import os, sys\nsys.exit(0 if os.environ.get('USER_SITECUSTOMIZE') == 'ran' else 9)\n")
    done = gradwatch_run(isolated_home, sys.executable, str(probe), env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr


# -- a stop decision ends an unmodified script cleanly -----------------------------------------------
STOP_SOON = """
rules:
  - name: give-up
    metric: loss
    detect: {type: early_stopping, patience: 5, min_delta: 1000}
    action: {type: stop}
    mode: act
"""


@pytest.mark.integration
@pytest.mark.parametrize("catch", [False, True], ids=["uncaught", "caught-to-checkpoint"])
def test_a_stop_decision_ends_the_script_with_status_0(catch: bool, agent_process: Any, isolated_home: Path,
                                                        tmp_path: Path) -> None:
    agent = agent_process()
    rules = tmp_path / "rules.yaml"
    rules.write_text(STOP_SOON)
    out = tmp_path / "out"
    done = gradwatch_run(isolated_home, sys.executable, str(SCRIPT), str(out), "--steps", "3000", "--sleep", "0.01",
                         *(["--catch"] if catch else []), options=("--run", "stopme", "--rules", str(rules)))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "gradwatch: stopping the run after step" in done.stderr
    last_step = int((out / "last_step").read_text())  # the script's finally block ran
    assert 5 <= last_step < 3000
    if catch:
        stopped = json.loads((out / "stopped.json").read_text())
        assert (out / "checkpoint.pt").exists() and stopped["step"] == last_step
        assert "rule give-up" in stopped["reason"]
    end = end_record(isolated_home, "stopme")
    assert end["status"] == "stopped" and "rule give-up" in end["error"]
    run = wait_until(lambda: next((r for r in http_json(agent.url + "/api/runs")["runs"]
                                   if r["run"] == "stopme" and r["status"] == "finished"), None),
                     timeout=30, what="the agent to see the run end")
    assert run["ranks"][0]["end_status"] == "stopped"
    assert run["ranks"][0]["actions"] == {"stop:patience_exhausted": 1}


# -- throughput without probe.log(batch_size=...) ----------------------------------------------------
@pytest.mark.parametrize(("options", "expected"), [((), 32), (("--batch-size", "5"), 20), (("--batch-size", "off"), None),
                                                   (("--batch-dim", "1"), 64)])
def test_samples_per_step_come_from_the_models_inputs(options: tuple[str, ...], expected: int | None,
                                                      isolated_home: Path, tmp_path: Path) -> None:
    """4 micro-batches of 8 samples (16 features) per step: 32 samples, each training forward adding its
    input's leading dimension; a fixed per-forward size; none; another dimension (16 features x 4). From the
    second step: the model is found at the first step (no global module hook, which torch.compile would trace)."""
    done = gradwatch_run(isolated_home, sys.executable, str(SETUPS), "accumulate", str(tmp_path / "out"),
                         options=("--run", "samples", *options))
    assert done.returncode == 0, done.stderr
    assert [r["values"].get("batch_size") for r in step_records(isolated_home, "samples")] == [None] + [expected] * 11


def test_a_bad_batch_size_flag_is_one_line(isolated_home: Path) -> None:
    done = gradwatch_run(isolated_home, sys.executable, "-c", "pass", options=("--batch-size", "lots"))
    assert done.returncode == 2 and "expected auto, off or a positive number" in done.stderr
    assert "Traceback" not in done.stderr


def test_gradwatch_run_names_a_launch_alike_on_every_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --run: a new name per launch, but one every machine of a multi-machine launch computes alike (from
    torchrun's --rdzv-id, or the SLURM job), so that each machine's spool holds the run under the same name."""
    from gradwatch.launch import default_run_name

    for var in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    single = ["python", "train.py"]
    assert default_run_name(single) != default_run_name(single) and default_run_name(single).startswith("train-")
    for torchrun in (["torchrun", "--nnodes", "2", "--rdzv-id", "job-7", "train.py"],
                     ["torchrun", "--nnodes=2", "--rdzv_id=job-7", "train.py"]):
        assert default_run_name(torchrun) == default_run_name(["torchrun", "--rdzv-id", "job-7", "x/train.py"])
    assert default_run_name(["torchrun", "--rdzv-id", "job-8", "train.py"]) != \
        default_run_name(["torchrun", "--rdzv-id", "job-7", "train.py"])
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert default_run_name(single) == default_run_name(single)
