"""What a tracker costs a training step, median and tail: the same loop in fresh processes, bare and with
gradwatch (or another tracker, where installed), logging six values per step.

    python benchmarks/step_cost.py                 # bare vs gradwatch, 6 processes each, ~2 minutes
    python benchmarks/step_cost.py --trackers gradwatch tensorboard --rounds 8

The loop: an MLP 784-256-256-10, batch 64, SGD with momentum, CPU, 2 intra-op threads; every step
``zero_grad, forward, backward, step`` and then six scalars logged (loss as a tensor, five floats). Each
process warms up, then times every step with ``perf_counter``; the variants alternate process by process
so slow phases of the machine hit them alike. Reported per variant: the median over processes of the
median step and of the p99 step. Cost = median step - the bare loop's median step.

Targets (issue 15): gradwatch's cost <= 30 us per step; its p99 step <= 1.2 x the bare loop's p99.
gradwatch includes its fused gradient-norm pass (what clip_grad_norm_ costs), which the others do not
compute. Results to stdout (Markdown) and benchmarks/results/step_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def worker(tracker: str, steps: int, warmup: int, home: str) -> dict[str, float]:
    import time

    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    log = _tracker(tracker, model, opt, home)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        log(i, loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    closer = getattr(log, "close", None)
    if closer is not None:
        closer()
    times.sort()
    return {"median_us": statistics.median(times) * 1e6, "p99_us": times[int(0.99 * len(times))] * 1e6,
            "mean_us": statistics.fmean(times) * 1e6}


def _tracker(name: str, model: object, opt: object, home: str):  # type: ignore[no-untyped-def]
    if name == "bare":
        return lambda step, loss: None
    if name == "gradwatch":
        import gradwatch

        probe = gradwatch.attach(model, opt, run="cost", home=home, autostart_agent=False)  # type: ignore[arg-type]

        def log(step: int, loss: object) -> None:
            probe.log(loss=loss, batch_size=64, accuracy=0.5, tokens=1000.0, lr_scale=1.0, aux=0.1)
        log.close = probe.close  # type: ignore[attr-defined]
        return log
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=home)

        def log(step: int, loss: object) -> None:
            for key, value in (("loss", loss), ("batch_size", 64), ("accuracy", 0.5), ("tokens", 1000.0),
                               ("lr_scale", 1.0), ("aux", 0.1)):
                writer.add_scalar(key, value, step)
        log.close = writer.close  # type: ignore[attr-defined]
        return log
    raise SystemExit(f"unknown tracker {name!r}; choose bare, gradwatch or tensorboard")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trackers", nargs="+", default=["gradwatch"], help="besides the bare loop")
    ap.add_argument("--rounds", type=int, default=6, help="processes per variant")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as home:
            print(json.dumps(worker(args.worker, args.steps, args.warmup, home)))
        return
    variants = ["bare", *args.trackers]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    env = {**os.environ, "GRADWATCH_AUTOSTART": "0"}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            print(f"\r  round {r + 1}/{args.rounds}: {variant:12}", end="", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup)], capture_output=True, text=True, check=True,
                                 env=env, timeout=600)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(file=sys.stderr)
    summary = {v: {k: statistics.median(run[k] for run in rs) for k in ("median_us", "p99_us", "mean_us")}
               for v, rs in runs.items()}
    bare = summary["bare"]
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{args.rounds} processes per variant x {args.steps} steps\n")
    print("| variant | median step | p99 step | cost (median - bare median) | p99 / bare p99 |")
    print("|---|---|---|---|---|")
    for v, s in summary.items():
        print(f"| {v} | {s['median_us']:.0f} µs | {s['p99_us']:.0f} µs | {s['median_us'] - bare['median_us']:+.0f} µs "
              f"| {s['p99_us'] / bare['p99_us']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_cost.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
