"""A plain loop whose learning rate a scheduler sets every step (warm-up with LambdaLR, OneCycleLR or
cosine annealing), pacing itself so that a command can arrive while it runs.

    python scheduled.py OUT_DIR lambda|onecycle|cosine [--steps 60] [--sleep 0.02]

Writes ``OUT_DIR/reference.json``: the LR each step used, and the schedule's LRs without any change
(the same scheduler stepped on a copy of the optimizer).
"""

import argparse
import json
import time
from pathlib import Path

import torch


def make_scheduler(kind, optimizer, steps):
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps + 1)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("kind", choices=["lambda", "onecycle", "cosine"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sleep", type=float, default=0.02)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = make_scheduler(args.kind, optimizer, args.steps)
    used = []
    for _ in range(args.steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        time.sleep(args.sleep)
    shadow = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
    shadow_scheduler = make_scheduler(args.kind, shadow, args.steps)
    schedule = []
    for _ in range(args.steps):
        schedule.append(shadow.param_groups[0]["lr"])
        shadow.step()
        shadow_scheduler.step()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reference.json").write_text(json.dumps({"used": used, "schedule": schedule}))


if __name__ == "__main__":
    main()
