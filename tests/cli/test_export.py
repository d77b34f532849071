"""A run's history, read back (``gradwatch.read_run``) and exported (``gradwatch export``) as CSV, JSON lines,
Parquet and TensorBoard event files, compared with what the training script itself saw at every step; and the
agent's decisions and the probe's actions in the same table."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.agent.daemon import Agent
from gradwatch.agent.settings import AgentConfig
from gradwatch.cli import main
from gradwatch.spool.format import SpoolLayout
from tests.conftest import SUPPORT, http_json, wait_until

STEPS = 24


def _train(home: Path) -> list[dict[str, Any]]:
    """A plain loop the way people write one: clipping, a step scheduler, a validation loss every 5 steps, and an
    LR cut sent as the agent would (a command file) at step 10. Returns what the script saw, step by step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=8, gamma=0.5)
    seen = []
    with gradwatch.attach(model, opt, run="history", home=home, autostart_agent=False, layer_stats_every=4,
                          flush_interval=0.01) as probe:
        for step in range(1, STEPS + 1):
            x = torch.randn(16, 8)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            lr = probe.learning_rates()[0]  # what this update uses, gradwatch's LR cut included
            opt.step()
            scheduler.step()
            values: dict[str, Any] = {"loss": loss}
            if step % 5 == 0:
                values["val_loss"] = 2.0 * float(loss.detach())
            probe.log(**values)
            seen.append({"step": step, "loss": loss.item(), "grad_norm": norm.item(), "lr": lr,
                         **({"val_loss": values["val_loss"]} if "val_loss" in values else {})})
            if step == 10:
                probe.wait_ready()
                assert probe.run_dir is not None
                commands = SpoolLayout.commands_file(probe.run_dir)
                commands.parent.mkdir(parents=True, exist_ok=True)
                commands.write_text(json.dumps({"id": "cut@10", "action": {"type": "reduce_lr", "factor": 0.5},
                                                "rule": "by-hand", "reason": "test", "trigger_step": 10}) + "\n")
                # the writer thread reads commands between steps: wait for it, so the cut lands in this short run
                wait_until(lambda: bool(probe._commands.inbox), timeout=10, what="the command read")
    return seen


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    home = tmp_path_factory.mktemp("spool")
    return home, _train(home)


def _float(text: str) -> float | None:
    return None if text == "" else float(text)


def _steps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["kind"] == "step"]


def _same_as_seen(rows: list[dict[str, Any]], seen: list[dict[str, Any]], number: Any = float) -> None:
    steps = _steps(rows)
    assert [int(r["step"]) for r in steps] == [s["step"] for s in seen]
    for row, s in zip(steps, seen, strict=True):
        assert number(row["loss"]) == s["loss"], row  # exact: the same float the script had
        assert number(row["grad_norm"]) == s["grad_norm"], row
        assert number(row["lr_0"]) == pytest.approx(s["lr"], rel=1e-12), row
        assert (number(row["val_loss"]) if row.get("val_loss") not in (None, "") else None) == s.get("val_loss")


def test_read_run_gives_every_step_as_the_script_saw_it(recorded: tuple[Path, list[dict[str, Any]]]) -> None:
    home, seen = recorded
    run = gradwatch.read_run("history", home)
    rank = run.rank(0)
    assert [s.step for s in rank.steps] == list(range(1, STEPS + 1))
    assert [s.grad_norm for s in rank.steps] == [s["grad_norm"] for s in seen]
    assert rank.scalar("val_loss") == [(s["step"], s["val_loss"]) for s in seen if "val_loss" in s]
    assert [(a.id, a.status.value) for a in rank.actions] == [("cut@10", "applied")]
    assert [layer.step for layer in rank.layers] == [4, 8, 12, 16, 20, 24]
    assert rank.end is not None and run.status == "finished"
    with pytest.raises(gradwatch.history.RunNotFound, match="runs there: history"):  # type: ignore[attr-defined]
        gradwatch.read_run("histroy", home)


def test_csv_export_is_exact(recorded: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    home, seen = recorded
    main(["export", "history", "--home", str(home), "-o", str(tmp_path / "h.csv")])
    assert "history: 24 steps of 1 rank(s)" in capsys.readouterr().err
    rows = list(csv.DictReader(io.StringIO((tmp_path / "h.csv").read_text())))
    _same_as_seen(rows, seen)
    action = next(r for r in rows if r["kind"] == "action")
    assert (action["id"], action["action"], action["status"], action["rule"]) == ("cut@10", "reduce_lr", "applied",
                                                                                    "by-hand")
    assert "->" in action["detail"]
    assert [r["kind"] for r in rows][-1] == "end"
    assert all(r["clip_threshold"] == "1.0" and r["clipped"] in ("true", "false") for r in _steps(rows))


def test_jsonl_export_is_exact_and_has_the_layers(recorded: tuple[Path, list[dict[str, Any]]],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    home, seen = recorded
    main(["export", "history", "--home", str(home), "--format", "jsonl", "-o", "-"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    _same_as_seen(rows, seen)
    layers = [r for r in rows if r["kind"] == "layers"]
    assert [r["step"] for r in layers] == [4, 8, 12, 16, 20, 24]
    assert set(layers[0]["layers"]) == {"0", "2"} and "update_ratio" in layers[0]["layers"]["0"]


def test_parquet_export_is_exact(recorded: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    home, seen = recorded
    main(["export", "history", "--home", str(home), "--format", "parquet", "-o", str(tmp_path / "h.parquet")])
    rows = pq.read_table(tmp_path / "h.parquet").to_pylist()
    _same_as_seen(rows, seen)


def test_tensorboard_export_opens_in_tensorboard(recorded: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    home, seen = recorded
    main(["export", "history", "--home", str(home), "--format", "tensorboard", "-o", str(tmp_path / "tb")])
    events = EventAccumulator(str(tmp_path / "tb" / "rank-0"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "val_loss", "gradwatch/grad_norm", "gradwatch/lr/group_0", "gradwatch/layer_grad_norm/0"} <= set(tags)
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in loss] == list(range(1, STEPS + 1))
    assert [v for _, v in loss] == pytest.approx([s["loss"] for s in seen], rel=1e-6)  # TensorBoard keeps float32
    norms = [e.value for e in events.Scalars("gradwatch/grad_norm")]
    assert norms == pytest.approx([s["grad_norm"] for s in seen], rel=1e-6)


def test_bad_export_requests_are_one_clear_line(recorded: tuple[Path, list[dict[str, Any]]],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = recorded
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "nope", "--home", str(home)])
    assert exit_info.value.code == 2 and "no run 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "history", "--home", str(home), "--format", "parquet", "-o", "-"])
    assert "cannot go to standard output" in capsys.readouterr().err


SPIKE_CUT = """
rules:
  - name: spike-cut
    metric: loss
    detect: {type: spike, z_threshold: 6}
    action: {type: reduce_lr, factor: 0.1}
    mode: act
    max_actions: 1
"""


@pytest.fixture
def agent(isolated_home: Path, tmp_path: Path) -> Iterator[Agent]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(SPIKE_CUT)
    daemon = Agent(AgentConfig(home=isolated_home, port=0, rules_file=rules))
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.mark.integration
def test_the_agents_decisions_and_the_probes_actions_are_in_the_export(agent: Agent, isolated_home: Path,
                                                                      tmp_path: Path) -> None:
    """A real agent cuts the LR on a spike: the export holds its decision (what it saw) and the ack (after which
    step the probe applied it), next to the steps."""
    result = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(SUPPORT / "rules_script.py"), "--result", str(result), "--sleep", "0.02",
                           "--steps", "220", "--lr-jump-at", "150", "--lr-jump", "20"],
                          env={**os.environ, "GRADWATCH_HOME": str(isolated_home)}, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()

    def finished() -> bool:
        runs = http_json(agent.url + "/api/runs")["runs"]
        return any(r["run"] == "rules" and r["status"] == "finished" for r in runs)

    wait_until(finished, timeout=30, what="the run finished at the agent")
    seen = json.loads(result.read_text())
    main(["export", "rules", "--home", str(isolated_home), "-o", str(tmp_path / "rules.csv")])
    rows = list(csv.DictReader(io.StringIO((tmp_path / "rules.csv").read_text())))
    assert [float(r["loss"]) for r in _steps(rows)] == seen["losses"]
    decision = next(r for r in rows if r["kind"] == "decision")
    action = next(r for r in rows if r["kind"] == "action")
    assert (decision["rule"], decision["action"], decision["mode"]) == ("spike-cut", "reduce_lr", "act")
    assert int(decision["step"]) >= 150 and json.loads(decision["detail"])["z"] > 6
    assert action["id"] == decision["id"] and action["status"] == "applied"
    assert int(action["step"]) >= int(decision["step"])
    cut_at = int(action["step"])
    lrs = {int(r["step"]): float(r["lr_0"]) for r in _steps(rows)}
    assert lrs[cut_at + 1] == pytest.approx(lrs[cut_at] * 0.1) and not math.isnan(lrs[cut_at])
