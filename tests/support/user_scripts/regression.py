"""Polynomial regression in the shape of PyTorch's official ``regression`` example: one ``nn.Linear``,
``smooth_l1_loss``, the weights updated by hand with no optimizer and no clipping.

    python regression.py OUT_DIR [--attach] [--steps 20]

Writes ``OUT_DIR/reference.json``: the gradient norm of each update and the loss.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

POLY_DEGREE = 4


def make_features(x):
    x = x.unsqueeze(1)
    return torch.cat([x ** i for i in range(1, POLY_DEGREE + 1)], 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--attach", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    w_target, b_target = torch.randn(POLY_DEGREE, 1) * 5, torch.randn(1) * 5
    fc = torch.nn.Linear(w_target.size(0), 1)
    probe = None
    if args.attach:
        import gradwatch

        probe = gradwatch.attach(fc)
    norms, losses = [], []
    for _ in range(args.steps):
        random = torch.randn(32)
        batch_x = make_features(random)
        batch_y = batch_x.mm(w_target) + b_target.item()
        fc.zero_grad()
        output = F.smooth_l1_loss(fc(batch_x), batch_y)
        loss = output.item()
        output.backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in fc.parameters()])))
        for param in fc.parameters():
            param.data.add_(-0.1 * param.grad)
        losses.append(loss)
        if probe is not None:
            probe.log(loss=output)
    if probe is not None:
        probe.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reference.json").write_text(json.dumps({"grad_norm": norms, "loss": losses}))


if __name__ == "__main__":
    main()
