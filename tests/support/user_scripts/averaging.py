"""Weight averaging the ways scripts do it: an EMA copy made with ``copy.deepcopy(model)`` and updated
after every step (timm, diffusers), or torch's SWA (``AveragedModel``, ``SWALR``, ``update_bn``),
with the averaged model saved whole (``torch.save``) and its copy evaluated.

    python averaging.py OUT_DIR ema|swa [--attach] [--steps 30]

Writes ``OUT_DIR/reference.json``: the gradient norm (before clipping) and loss of each step, and where
the averaged model was saved.
"""

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn as nn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("kind", choices=["ema", "swa"])
    ap.add_argument("--attach", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = [(torch.randn(16, 6), torch.randn(16, 1)) for _ in range(10)]
    probe = None
    if args.attach:
        import gradwatch

        probe = gradwatch.attach(model, optimizer)
    if args.kind == "ema":
        averaged = copy.deepcopy(model).eval()
        for p in averaged.parameters():
            p.requires_grad_(False)
    else:
        averaged = torch.optim.swa_utils.AveragedModel(model)
        swa_scheduler = torch.optim.swa_utils.SWALR(optimizer, swa_lr=0.01, anneal_epochs=2)
    norms, losses = [], []
    for step in range(args.steps):
        x, y = data[step % len(data)]
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        losses.append(loss.item())
        if probe is not None:
            probe.log(loss=loss)
        if args.kind == "ema":
            with torch.no_grad():
                for e, p in zip(averaged.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 0.1)
        elif step >= args.steps // 2:
            averaged.update_parameters(model)
            swa_scheduler.step()
    if args.kind == "swa":
        torch.optim.swa_utils.update_bn([x for x, _ in data], averaged)
    torch.save(averaged, out / "averaged.pt")
    evaluation = copy.deepcopy(averaged).eval()  # a copy of the copy, as evaluation loops make
    with torch.no_grad():
        val = float(nn.functional.mse_loss(evaluation(data[0][0]), data[0][1]))
    if probe is not None:
        probe.close()
    (out / "reference.json").write_text(json.dumps(
        {"grad_norm": norms, "loss": losses, "saved": str(out / "averaged.pt"), "val": val}))


if __name__ == "__main__":
    main()
