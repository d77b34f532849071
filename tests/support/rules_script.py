"""A real training loop that runs into trouble on purpose, for the rules tests (run as a subprocess).

Regression of a noisy teacher network; optional faults: a learning-rate jump (loss spike and
divergence), a NaN batch (non-finite gradients). With ``torchrun`` it trains with DDP on gloo.
Writes what it saw to ``--result`` (with ``{rank}`` in the path for several ranks): the steps
run, whether it stopped, each step's learning rate, loss and the final parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-name", default="rules")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rules", default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-jump-at", type=int, default=0, help="multiply the LR by --lr-jump at this step")
    parser.add_argument("--lr-jump", type=float, default=30.0)
    parser.add_argument("--nan-at", type=int, default=0, help="make this step's loss NaN (NaN gradients)")
    parser.add_argument("--nan-rank", type=int, default=-1, help="only on this rank (default: every rank)")
    parser.add_argument("--signal-at", type=int, default=0, help="log signal=1 at this step (0 otherwise)")
    parser.add_argument("--val-every", type=int, default=0, help="log val_loss on held-out data every N steps")
    parser.add_argument("--on-stop", default="flag")
    parser.add_argument("--ctrl-c-at", type=int, default=0, help="press Ctrl-C at this step (SIGINT to itself)")
    parser.add_argument("--exit-at", type=int, default=0, help="sys.exit(--exit-code) at this step")
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--raise-at", type=int, default=0, help="raise RuntimeError at this step (a crash)")
    parser.add_argument("--slow-rank", type=int, default=-1, help="this rank sleeps 5x --sleep per step")
    parser.add_argument("--result", default="")
    args = parser.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        x_val = torch.randn(256, 8)
        y_val = teacher(x_val) + 0.05 * torch.randn(256, 1)
    model: torch.nn.Module = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    probe = gradwatch.attach(model, optimizer, run=args.run_name or None, rules=args.rules, on_stop=args.on_stop)
    data = torch.Generator().manual_seed(1 + rank)
    lrs, losses, stopped_at = [], [], None
    try:
        for step in range(1, args.steps + 1):
            if step == args.lr_jump_at:
                for group in optimizer.param_groups:
                    group["lr"] *= args.lr_jump
            x = torch.randn(32, 8, generator=data)
            with torch.no_grad():
                y = teacher(x) + 0.05 * torch.randn(32, 1, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), y)
            if step == args.nan_at and args.nan_rank in (-1, rank):
                loss = loss * float("nan")
            optimizer.zero_grad()
            loss.backward()
            if args.sleep:  # the pace is the step's compute (a GPU step), not a wait for data
                time.sleep(args.sleep * (5 if rank == args.slow_rank else 1))
            optimizer.step()
            values = {"loss": loss, "batch_size": 32}
            if args.signal_at:
                values["signal"] = float(step == args.signal_at)
            if args.val_every and step % args.val_every == 0:
                with torch.no_grad():
                    values["val_loss"] = torch.nn.functional.mse_loss(model(x_val), y_val)
            probe.log(**values)
            lrs.append(probe.learning_rates()[0])  # what the next update uses, gradwatch's LR cuts included
            losses.append(loss.item())
            if step == args.ctrl_c_at:
                os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt, raised here, ends the script
            if step == args.exit_at:
                sys.exit(args.exit_code)
            if step == args.raise_at:
                raise RuntimeError(f"a bug at step {step}")
            if probe.should_stop:
                stopped_at = step
                break
    except gradwatch.StopTraining:
        stopped_at = probe.step
    probe.close()
    if args.result:
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        with open(args.result.format(rank=rank), "w") as f:
            json.dump({"rank": rank, "steps": probe.step, "stopped_at": stopped_at, "stop_reason": probe.stop_reason,
                       "lrs": lrs, "losses": losses, "params": params.tolist(), "run": probe.run}, f)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
