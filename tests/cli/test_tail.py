"""``gradwatch tail RUN``: the last steps of a recorded run, then a live run followed until it ends by itself;
events get their own lines, and a fast run is thinned rather than flooding the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradwatch.cli import main
from gradwatch.spool.records import AckRecord, AckStatus, StepRecord
from gradwatch.tail import lines
from tests.cli.test_inspect import STEPS, _record
from tests.conftest import wait_until


def test_the_last_steps_and_the_end_of_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(tmp_path, "spiky", lr_jump_at=100, batch_size=True)
    main(["tail", "spiky", "--home", str(tmp_path), "--no-follow", "-n", "5"])
    out = capsys.readouterr().out.splitlines()
    steps = [int(line.split()[1]) for line in out if "loss" in line]
    assert steps == list(range(STEPS - 4, STEPS + 1))
    assert out[-1].startswith(f"step {STEPS:>7}  r0  ENDED finished")
    assert all("lr 0.01" in line and " ms" in line for line in out if "loss" in line)
    # further back: the spike's on-trigger layer sample has a line of its own, at its step
    main(["tail", "spiky", "--home", str(tmp_path), "--no-follow", "-n", "100"])
    out = capsys.readouterr().out.splitlines()
    [spike] = [line for line in out if "SPIKE" in line]
    assert spike.startswith("step     101  r0  SPIKE (") and "largest layer gradient norms `" in spike
    assert out.index(spike) == next(i for i, line in enumerate(out) if line.startswith("step     101")) + 1
    main(["tail", "spiky", "--home", str(tmp_path), "--no-follow", "-n", "0"])
    assert capsys.readouterr().out == ""  # as tail -n 0: nothing from before now


def test_an_unknown_run_is_one_line_naming_the_runs_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "runs" / "real-one").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["tail", "nope", "--home", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gradwatch: error: no run 'nope'") and "runs there: real-one" in err


TRAINER = textwrap.dedent("""
    import time, torch, gradwatch
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.attach(model, opt, run="live", autostart_agent=False) as probe:
        for step in range(1, 81):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            probe.log(loss=loss, **({"val_loss": 0.5} if step % 20 == 0 else {}))
            time.sleep(0.04)
""")


def test_a_live_run_is_followed_until_it_ends_by_itself(tmp_path: Path) -> None:
    env = {**os.environ, "GRADWATCH_HOME": str(tmp_path), "GRADWATCH_AUTOSTART": "0"}
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER], env=env)
    try:
        wait_until((tmp_path / "runs" / "live").is_dir, timeout=60, what="the run's directory")
        tail = subprocess.run([sys.executable, "-m", "gradwatch", "tail", "live", "-n", "0"], env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        trainer.wait(timeout=60)
    assert tail.returncode == 0, tail.stderr
    out = tail.stdout.splitlines()
    steps = [int(line.split()[1]) for line in out if "  loss " in line]
    assert steps == sorted(steps) and steps[-1] == 80 and len(steps) >= 40  # thinned only when a poll had many
    assert [line.split()[1] for line in out if "val_loss" in line][-3:] == ["40", "60", "80"]
    assert out[-1].startswith("step      80  r0  ENDED finished")


def test_a_fast_run_prints_the_newest_step_per_interval_and_every_event() -> None:
    batch = [(0, StepRecord(step=s, t=float(s), grad_norm=1.0, lr=[0.1], values={"loss": 1.0})) for s in range(1, 101)]
    batch.insert(50, (0, AckRecord(step=50, t=50.0, id="c1", action="reduce_lr", status=AckStatus.APPLIED,
                                   rule="loss-spike", reason="spike", detail="lr 0.1 -> 0.05")))
    batch[70] = (0, StepRecord(step=70, t=70.0, values={"loss": 1.0, "val_loss": 2.0}))
    out = list(lines(batch))
    assert len(out) == 3
    assert "ACTION reduce_lr applied (loss-spike: spike): lr 0.1 -> 0.05" in out[0]
    assert out[1].startswith("step      70") and "val_loss 2" in out[1] and "(+" in out[1]
    assert out[2].startswith("step     100") and out[2].endswith("(+29 steps)")
