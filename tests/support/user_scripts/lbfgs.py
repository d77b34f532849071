"""A full-batch LBFGS fit: ``optimizer.step(closure)``, where the closure computes the loss and runs the
backward pass (torch calls it several times per step).

    python lbfgs.py OUT_DIR [--attach] [--steps 6]

Writes ``OUT_DIR/reference.json``: the gradient norm left by each step's last closure call, and the
loss ``step()`` returned.
"""

import argparse
import json
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--attach", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.1 * torch.randn(64, 1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    probe = None
    if args.attach:
        import gradwatch

        probe = gradwatch.attach(model, optimizer)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    norms, losses = [], []
    for _ in range(args.steps):
        loss = optimizer.step(closure)
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        losses.append(loss.item())
        if probe is not None:
            probe.log(loss=loss)
    if probe is not None:
        probe.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reference.json").write_text(json.dumps({"grad_norm": norms, "loss": losses}))


if __name__ == "__main__":
    main()
