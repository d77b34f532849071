"""A plain loop whose learning rate changes every step, set by a torch scheduler (warm-up with LambdaLR,
OneCycleLR, cosine annealing) or by the script itself (``hand``: nanoGPT's warm-up + cosine ``get_lr(it)``
assigned to every param group at the top of each iteration), pacing itself so that a command can
arrive while it runs.

    python scheduled.py OUT_DIR lambda|onecycle|cosine|hand [--steps 60] [--sleep 0.02] [--attach]

Plain SGD in float64, so the LR each update really used is measured from the update itself:
``lr = -(dw . g) / (g . g)``. Writes ``OUT_DIR/reference.json``: those LRs (``used``), the LR the
script had set at each step (``set``), and the schedule without any change (``schedule``).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

MAX_LR, MIN_LR, WARMUP = 0.05, 0.005, 10


def get_lr(it, steps):
    """nanoGPT's schedule: linear warm-up, then cosine decay to MIN_LR."""
    if it < WARMUP:
        return MAX_LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / max(1, steps - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (MAX_LR - MIN_LR)


def make_scheduler(kind, optimizer, steps):
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps + 1,
                                                   cycle_momentum=False)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("kind", choices=["lambda", "onecycle", "cosine", "hand"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sleep", type=float, default=0.02)
    ap.add_argument("--attach", action="store_true", help="gradwatch.attach() instead of gradwatch run")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=MAX_LR)
    scheduler = make_scheduler(args.kind, optimizer, args.steps)
    probe = None
    if args.attach:
        import gradwatch

        probe = gradwatch.attach(model, optimizer)
    used, set_lrs = [], []
    for it in range(args.steps):
        if args.kind == "hand":
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it, args.steps)
        loss = model(torch.randn(8, 4, dtype=torch.float64)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        set_lrs.append(optimizer.param_groups[0]["lr"])
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]
        optimizer.step()
        delta = sum(float(((p.detach() - b) * g).sum()) for p, b, g in zip(model.parameters(), before, grads, strict=True))
        used.append(-delta / sum(float((g * g).sum()) for g in grads))
        if probe is not None:
            probe.log(loss=loss)
        if scheduler is not None:
            scheduler.step()
        time.sleep(args.sleep)
    if probe is not None:
        probe.close()
    if args.kind == "hand":
        schedule = [get_lr(it, args.steps) for it in range(args.steps)]
    else:
        shadow = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=MAX_LR)
        shadow_scheduler = make_scheduler(args.kind, shadow, args.steps)
        schedule = []
        for _ in range(args.steps):
            schedule.append(shadow.param_groups[0]["lr"])
            shadow.step()
            shadow_scheduler.step()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reference.json").write_text(json.dumps({"used": used, "set": set_lrs, "schedule": schedule}))


if __name__ == "__main__":
    main()
