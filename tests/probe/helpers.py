"""Small real training loops and a reader of what a probe wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gradwatch.spool.format import SpoolLayout
from tests.spool_records import run_records


def tiny_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, probe: Any, steps: int,
                batch_size: int = 4) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(batch_size, 8)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if probe is not None:
            probe.log(loss=loss, batch_size=batch_size)
        losses.append(loss.item())
    return losses


def read_run(home: Path, run: str, rank: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run_dir = SpoolLayout(home).run_dir(run)
    meta = json.loads(SpoolLayout.meta_file(run_dir, rank).read_text())
    return meta, run_records(home, run, rank)


def logged(records: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(step, values) of every probe.log() call: merged into step records, or log records of their own."""
    return [(r["step"], r["values"]) for r in records if "values" in r]
