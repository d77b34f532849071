"""The exported metrics: Prometheus naming rules, labels, and promtool's linter on a real scrape."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gradwatch.agent import catalogue
from gradwatch.agent.collector import AgentCollector
from gradwatch.agent.gpus import GpuCollector
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.state import AgentState
from tests.agent.helpers import FakeClock, SpoolBuilder
from tests.support.fake_nvml import FakeGpu, FakeNvml

NAME = re.compile(r"^gradwatch_[a-z][a-z0-9_]*[a-z0-9]$")


def test_catalogue_follows_prometheus_naming() -> None:
    names = [spec.name for spec in catalogue.ALL]
    assert len(names) == len(set(names))
    for spec in catalogue.ALL:
        assert NAME.match(spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert spec.help.strip().endswith(".") and len(spec.help) > 15, spec.name
        assert not re.search(r"_(ms|milliseconds|minutes|hours)(_|$)", spec.name), f"{spec.name}: use base units"
        if spec.name.startswith("gradwatch_agent_"):
            assert "run" not in spec.labels
        elif spec.name.startswith("gradwatch_gpu_"):  # one series per GPU, naming the run on it
            assert spec.labels[:5] == ("gpu", "uuid", "host", "run", "rank"), spec.name
        else:
            assert spec.labels[:2] == ("run", "rank"), f"{spec.name}: every per-run series carries run and rank"


def test_required_metric_names_are_exported() -> None:
    names = {spec.name for spec in catalogue.ALL}
    assert {"gradwatch_loss", "gradwatch_grad_norm", "gradwatch_learning_rate", "gradwatch_steps_total",
            "gradwatch_step_duration_seconds", "gradwatch_data_wait_seconds", "gradwatch_samples_per_second",
            "gradwatch_nonfinite_total", "gradwatch_last_step_timestamp_seconds", "gradwatch_run_info",
            "gradwatch_run_state", "gradwatch_metric"} <= names


@pytest.fixture
def scrape(tmp_path: Path) -> str:
    spool = SpoolBuilder(tmp_path)
    spool.start("a", labels={"team": "vision", "odd key!": "x"})
    spool.steps("a", 0, 1, 30, nan_every=10)
    spool.append("a", 0, {"kind": "log", "step": 30, "t": 1_000_003.0, "values": {"val_loss": 0.3}})
    spool.append("a", 0, {"kind": "step", "step": 31, "t": 1_000_003.1, "grad_norm": 1.0, "lr": [0.1],
                          "cuda_mem": {"allocated": 2**30, "reserved": 2**31, "peak": 3 * 2**30, "total": 2**36}},
                 {"kind": "layers", "step": 31, "t": 1_000_003.1, "layers": ["enc.0", "enc.1"],
                  "grad_norm": [0.5, 0.25], "update_ratio": {"enc.0": 1e-3}})
    spool.start("b", rank=1, world_size=2)
    spool.steps("b", 1, 1, 5)
    spool.start("gan")  # two optimizers in turn: the second's steps carry "opt"
    for step in (1, 2):
        spool.append("gan", 0, {"kind": "step", "step": step, "t": 1_000_000.0 + step, "grad_norm": 19.0,
                                "lr": [2e-4], "values": {"loss": 1.4}},
                     {"kind": "step", "step": step, "t": 1_000_000.5 + step, "grad_norm": 3.5, "lr": [1e-4],
                      "values": {"loss": 0.7}, "opt": "1"})
    state = AgentState(spike_window=1e9)
    clock = FakeClock()
    SpoolIngestor(spool.layout, state, clock).scan_all()
    state.refresh(clock(), stall_after=1e9, ended_ttl=1e9, local_host="x")
    # NVML is faked here (no GPU on CI machines): one GPU runs run "a" (this process's pid), one is idle
    gpus = GpuCollector(FakeNvml([FakeGpu(uuid="GPU-a", pids=[os.getpid()]), FakeGpu(uuid="GPU-b")]))
    gpus.refresh()
    return AgentCollector(state, clock, gpus=gpus, local_host="elsewhere").exposition().decode()


def test_every_catalogue_metric_appears_in_a_scrape(scrape: str) -> None:
    for spec in catalogue.ALL:
        assert f"# TYPE {spec.name} {spec.kind}\n" in scrape, spec.name
    assert 'gradwatch_metric{name="val_loss",rank="0",run="a"} 0.3' in scrape
    assert 'label_team="vision"' in scrape and 'label_odd_key_="x"' in scrape
    assert 'gradwatch_run_state{rank="1",run="b",state="running"} 1.0' in scrape
    assert 'gradwatch_layer_grad_norm{layer="enc.0",rank="0",run="a"} 0.5' in scrape
    assert 'gradwatch_layer_update_ratio{layer="enc.0",rank="0",run="a"} 0.001' in scrape
    assert 'gradwatch_cuda_memory_reserved_bytes{rank="0",run="a"} 2.147483648e+09' in scrape
    assert 'gradwatch_gpu_utilization_ratio{gpu="0",host="elsewhere",rank="0",run="a",uuid="GPU-a"} 0.87' in scrape
    assert 'gradwatch_gpu_utilization_ratio{gpu="1",host="elsewhere",rank="",run="",uuid="GPU-b"} 0.87' in scrape
    assert "gradwatch_agent_gpus 2.0" in scrape


def test_each_optimizer_of_a_run_has_its_own_series(scrape: str) -> None:
    for name, first, second in (("gradwatch_loss", "1.4", "0.7"), ("gradwatch_grad_norm", "19.0", "3.5"),
                                ("gradwatch_steps_total", "2.0", "2.0")):
        assert f'{name}{{optimizer="0",rank="0",run="gan"}} {first}' in scrape, name
        assert f'{name}{{optimizer="1",rank="0",run="gan"}} {second}' in scrape, name
    assert 'gradwatch_learning_rate{group="0",optimizer="1",rank="0",run="gan"} 0.0001' in scrape
    assert 'gradwatch_loss{optimizer="0",rank="0",run="a"}' in scrape  # one optimizer: "0"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with the Debian package prometheus")
def test_promtool_check_metrics_passes_without_warnings(scrape: str) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", \
        result.stdout + result.stderr


def test_step_time_and_data_wait_are_counters_prometheus_can_rate(scrape: str) -> None:
    """Run b: 5 steps of 0.1 s, each with 0.02 s of data wait. Summed, rate() over rate(steps) is the mean step
    time and rate(wait) over rate(step time) the data-wait fraction, whatever the scrape interval."""
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in scrape.splitlines()
              if line.startswith(("gradwatch_step_seconds_total{", "gradwatch_data_wait_seconds_total{"))}
    assert values['gradwatch_step_seconds_total{rank="1",run="b"}'] == pytest.approx(0.5)
    assert values['gradwatch_data_wait_seconds_total{rank="1",run="b"}'] == pytest.approx(0.1)
