"""What a tracker costs a training step, median and tail: the same loop in fresh processes, bare and with
gradwatch (or another tracker, where installed), logging six values per step.

    python benchmarks/step_cost.py                 # bare vs gradwatch, 6 processes, ~2 minutes
    python benchmarks/step_cost.py --trackers gradwatch tensorboard --rounds 8

The loop: an MLP 784-128-10, batch 64 (about 0.6 ms a step here), SGD with momentum, CPU, 2 intra-op threads; every step
``zero_grad, forward, backward, step`` and then six scalars logged (loss as a tensor, five floats). Each
process warms up, then times every step with ``perf_counter``. Each tracker runs in its own processes,
and each process runs both copies of the loop, bare and tracked, alternating in blocks of 200 steps, so
slow phases of the machine hit them alike. Reported per tracker, as the median over processes: the
median step of each copy, the cost (tracked median - bare median, paired within a process), the p99
steps and their ratio.

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


def worker(tracker: str, steps: int, warmup: int, home: str, block: int = 200) -> dict[str, dict[str, float]]:
    """One process: two copies of the loop, bare and tracked, alternating in blocks of ``block`` steps, so
    that what slows this process (the VM, caches, the other core) slows both alike."""
    import time

    import torch

    torch.set_num_threads(2)

    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    loops = {"bare": (*make(), lambda step, loss: None)}
    model, opt = make()
    loops[tracker] = (model, opt, _tracker(tracker, model, opt, home))
    times: dict[str, list[float]] = {name: [] for name in loops}
    done = dict.fromkeys(loops, 0)
    while min(done.values()) < warmup + steps:
        for name, (model, opt, log) in loops.items():
            for _ in range(block):
                i = done[name]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                log(i, loss)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
                done[name] = i + 1
    closer = getattr(loops[tracker][2], "close", None)
    if closer is not None:
        closer()
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = {"median_us": statistics.median(ts) * 1e6, "p99_us": ts[int(0.99 * len(ts))] * 1e6,
                     "mean_us": statistics.fmean(ts) * 1e6}
    return out


def _tracker(name: str, model: object, opt: object, home: str):  # type: ignore[no-untyped-def]
    import torch

    if name == "bare":
        return lambda step, loss: None
    if name == "norm-only":  # what every gradient-norm tracker pays: torch's own fused norm, read back
        params = list(model.parameters())  # type: ignore[attr-defined]

        def log(step: int, loss: object) -> None:
            torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
        return log
    if name == "gradwatch":
        import gradwatch

        probe = gradwatch.attach(model, opt, run="cost", home=home, autostart_agent=False)  # type: ignore[arg-type]

        def log(step: int, loss: object) -> None:
            probe.log(loss=loss, batch_size=64, accuracy=0.5, tokens=1000.0, lr_scale=1.0, aux=0.1)
        log.close = probe.close  # type: ignore[attr-defined]
        return log
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(log_dir=home)

        def log(step: int, loss: object) -> None:
            for key, value in (("loss", loss), ("batch_size", 64), ("accuracy", 0.5), ("tokens", 1000.0),
                               ("lr_scale", 1.0), ("aux", 0.1)):
                writer.add_scalar(key, value, step)
        log.close = writer.close  # type: ignore[attr-defined]
        return log
    raise SystemExit(f"unknown tracker {name!r}; choose gradwatch, norm-only or tensorboard")


def _median(paired: list[dict[str, dict[str, float]]], loop: str, key: str) -> float:
    return statistics.median(p[loop][key] for p in paired)


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
    env = {**os.environ, "GRADWATCH_AUTOSTART": "0"}
    rows = []
    runs: dict[str, list[dict[str, dict[str, float]]]] = {t: [] for t in args.trackers}
    for tracker in args.trackers:
        for r in range(args.rounds):
            print(f"\r  {tracker}: process {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--worker", tracker, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup)], capture_output=True, text=True, check=True,
                                 env=env, timeout=600)
            runs[tracker].append(json.loads(out.stdout.strip().splitlines()[-1]))
        paired = runs[tracker]
        cost = statistics.median(p[tracker]["median_us"] - p["bare"]["median_us"] for p in paired)
        ratio = statistics.median(p[tracker]["p99_us"] / p["bare"]["p99_us"] for p in paired)
        rows.append((tracker, _median(paired, "bare", "median_us"), _median(paired, tracker, "median_us"), cost,
                     _median(paired, "bare", "p99_us"), _median(paired, tracker, "p99_us"), ratio))
    print(file=sys.stderr)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{args.rounds} processes per tracker, {args.steps} timed steps of each loop per process\n")
    print("| tracker | median step, bare / tracked | cost per step (paired) | p99 step, bare / tracked | p99 ÷ bare p99 |")
    print("|---|---|---|---|---|")
    for tracker, bare_med, med_t, cost, bare_p99, p99_t, ratio in rows:
        print(f"| {tracker} | {bare_med:.0f} / {med_t:.0f} µs | {cost:+.0f} µs | {bare_p99:.0f} / {p99_t:.0f} µs "
              f"| {ratio:.2f} |")
    summary = {r[0]: {"bare_median_us": r[1], "median_us": r[2], "cost_us": r[3], "bare_p99_us": r[4],
                      "p99_us": r[5], "p99_ratio": r[6]} for r in rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_cost.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
