"""What agreeing commands over torch.distributed costs a data-parallel step (issue 14).

Two ranks of DDP on gloo (CPU, one torchrun launch presented as two machines: ``LOCAL_WORLD_SIZE=1``)
train a small MLP with a probe attached. Rounds alternate the probe's command exchange on
(``GRADWATCH_COMMAND_SYNC=collective``, a round every ``--every`` steps) and off (``file``); the cost is
the difference of the median step times, per round and overall, with no command in flight (the
usual case) and with one command per round.

    python benchmarks/command_sync.py                 # 6 rounds of 600 steps each way
    python benchmarks/command_sync.py --rounds 2 --steps 300

Results: stdout (Markdown) and benchmarks/results/command_sync.json.
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
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import gradwatch

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradwatch.attach(model, optimizer, run=f"sync-{os.environ['GRADWATCH_COMMAND_SYNC']}",
                             autostart_agent=False, layer_stats_every=0)
    sync = probe._sync
    inside: list[float] = []  # the time each step spends in the exchange itself
    if sync is not None:
        at_step = sync.at_step

        def timed(step: int, inbox: object) -> None:
            start = time.perf_counter()
            at_step(step, inbox)  # type: ignore[arg-type]
            inside.append(time.perf_counter() - start)

        sync.at_step = timed  # type: ignore[method-assign]
    if args.with_command and sync is not None and rank == 0:
        from gradwatch.probes.control import parse_command

        noop = {"id": "", "action": {"type": "scale_clip", "factor": 1.0}, "apply_at_step": None, "trigger_step": 0}
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    times = []
    for step in range(1, args.steps + 1):
        if args.with_command and sync is not None and rank == 0 and step % sync.every == 1:
            sync.incoming.append(parse_command({**noop, "id": f"noop@{step}"}))
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    probe.close()
    if rank == 0:
        Path(args.out).write_text(json.dumps({"steps": times[args.steps // 10:], "inside": inside[args.steps // 10:]}))
    dist.destroy_process_group()


def run_round(mode: str, args: argparse.Namespace, home: str, with_command: bool) -> dict[str, list[float]]:
    out = Path(home) / f"times-{mode}.json"
    env = {**os.environ, "GRADWATCH_HOME": home, "GRADWATCH_COMMAND_SYNC": mode, "LOCAL_WORLD_SIZE": "1",
           "GRADWATCH_COMMAND_SYNC_EVERY": str(args.every), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(29500 + os.getpid() % 1000), __file__, "--worker", "--steps", str(args.steps), "--out",
                    str(out), *(["--with-command"] if with_command else [])], env=env, check=True,
                   capture_output=True, timeout=600)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="")
    parser.add_argument("--with-command", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    for case, with_command in (("idle", False), ("one command per round", True)):
        medians: dict[str, list[float]] = {"file": [], "collective": []}
        inside: list[float] = []
        for i in range(args.rounds):
            for mode in ("file", "collective") if i % 2 == 0 else ("collective", "file"):
                with tempfile.TemporaryDirectory() as home:
                    measured = run_round(mode, args, home, with_command)
                    medians[mode].append(statistics.median(measured["steps"]))
                    inside += measured["inside"]
            print(f"{case}: round {i + 1}/{args.rounds}", file=sys.stderr)
        cost = [c - f for c, f in zip(medians["collective"], medians["file"], strict=True)]
        results[case] = {"median_step_file_us": statistics.median(medians["file"]) * 1e6,
                         "median_step_collective_us": statistics.median(medians["collective"]) * 1e6,
                         "cost_per_step_us": statistics.median(cost) * 1e6,
                         "cost_per_round_us": [round(c * 1e6, 1) for c in cost],
                         "exchange_median_us": statistics.median(inside) * 1e6,
                         "exchange_mean_us": statistics.fmean(inside) * 1e6,
                         "exchange_max_us": max(inside) * 1e6}
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "every": args.every, "steps": args.steps, "rounds": args.rounds,
              "results": results}
    out = Path(__file__).resolve().parent / "results" / "command_sync.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"| case | median step, file | median step, collective | difference (median of {args.rounds} rounds) "
          "| in the exchange, per step: median / mean / max |")
    print("|---|---|---|---|---|")
    for case, r in results.items():
        print(f"| {case} | {r['median_step_file_us']:.0f} µs | {r['median_step_collective_us']:.0f} µs | "
              f"{r['cost_per_step_us']:+.1f} µs | {r['exchange_median_us']:.1f} / {r['exchange_mean_us']:.1f} / "
              f"{r['exchange_max_us']:.0f} µs |")


if __name__ == "__main__":
    main()
