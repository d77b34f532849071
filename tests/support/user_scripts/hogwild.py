"""Hogwild training in the shape of PyTorch's ``mnist_hogwild`` example: one model in shared memory,
``torch.multiprocessing.Process`` workers without a rank, each with its own optimizer and data order,
the parent waiting for them and then testing the model.

    python hogwild.py OUT_DIR [--workers 2] [--steps 30] [--attach] [--raise-in WORKER]

Each worker writes ``OUT_DIR/worker-<i>.json``: its losses. With ``--attach`` each worker attaches a
probe itself (``gradwatch.attach(model, optimizer)``); otherwise run it under ``gradwatch run``.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def train(rank, args, model):
    torch.manual_seed(1 + rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    probe = None
    if args.attach:
        import gradwatch

        probe = gradwatch.attach(model, optimizer)
    losses = []
    model.train()
    for step in range(args.steps):
        if rank == args.raise_in and step == 5:
            raise RuntimeError("worker failed")
        data = torch.randn(16, 20)
        target = (data[:, :4].argmax(dim=1))
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if probe is not None:
            probe.log(loss=loss)
    if probe is not None:
        probe.close()
    (Path(args.out) / f"worker-{rank}.json").write_text(json.dumps({"loss": losses}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--attach", action="store_true")
    ap.add_argument("--raise-in", type=int, default=-1, help="this worker raises after 5 steps")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Net()
    model.share_memory()  # gradients are allocated individually in each process
    processes = []
    for rank in range(args.workers):
        p = mp.Process(target=train, args=(rank, args, model))
        p.start()
        processes.append(p)
    for p in processes:
        p.join()
    assert all(p.exitcode == (1 if i == args.raise_in else 0) for i, p in enumerate(processes)), \
        [p.exitcode for p in processes]
    with torch.no_grad():
        model.eval()
        data = torch.randn(64, 20)
        accuracy = (model(data).argmax(dim=1) == data[:, :4].argmax(dim=1)).float().mean().item()
    (Path(args.out) / "test.json").write_text(json.dumps({"accuracy": accuracy}))


if __name__ == "__main__":
    main()
