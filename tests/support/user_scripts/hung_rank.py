"""A DDP run (gloo, CPU) in which one rank stops before a step, as a rank does that waits on a slow filesystem or a
dead data loader: the others go on into the step and wait in DDP's gradient all-reduce.

    torchrun --nproc-per-node 3 hung_rank.py RELEASE_FILE [--stuck-rank 1] [--steps 10] [--stuck-at 5]

The stuck rank waits in ``wait_for_release`` until RELEASE_FILE exists; then every rank finishes its steps.
"""

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gradwatch


def wait_for_release(path):
    while not os.path.exists(path):
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("release")
    ap.add_argument("--stuck-rank", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--stuck-at", type=int, default=5)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                                        torch.nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, run="hung") as probe:
        for step in range(1, args.steps + 1):
            if step == args.stuck_at and rank == args.stuck_rank:
                wait_for_release(Path(args.release))
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
