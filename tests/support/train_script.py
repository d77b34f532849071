"""A real training loop with a probe, run as a subprocess by the tests.

It writes what it did (steps, last loss, NaNs it logged) as JSON to --result, so tests
compare what Prometheus/the agent report against the truth.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="it")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to make the run last")
    parser.add_argument("--nan-every", type=int, default=0, help="log a NaN 'probe_nan' metric every N steps")
    parser.add_argument("--crash-at", type=int, default=0, help="raise an exception at this step")
    parser.add_argument("--hang-at", type=int, default=0, help="stop stepping (sleep forever) at this step")
    parser.add_argument("--result", default="")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = gradwatch.attach(model, optimizer, run=args.run)
    last_loss = None
    nans = 0
    for step in range(1, args.steps + 1):
        if step == args.crash_at:
            raise RuntimeError(f"deliberate crash at step {step}")
        if step == args.hang_at:
            print("hanging", flush=True)
            time.sleep(3600)
        x = torch.randn(args.batch_size, 20)
        y = x.sum(dim=1, keepdim=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        extra = {}
        if args.nan_every and step % args.nan_every == 0:
            extra["probe_nan"] = math.nan
            nans += 1
        probe.log(loss=loss, batch_size=args.batch_size, **extra)
        last_loss = loss.item()
        if args.sleep:
            time.sleep(args.sleep)
    probe.close()
    if args.result:
        with open(args.result, "w") as f:
            json.dump({"steps": args.steps, "last_loss": last_loss, "nans": nans, "run": probe.run,
                       "samples": args.steps * args.batch_size, "dropped": probe.dropped}, f)


if __name__ == "__main__":
    main()
