"""Detection-to-action latency of agent-side rules, and the step of in-probe guards.

A real training loop runs at --rate steps/s (default 20) with a real `gradwatch agent`
process beside it. Every --every steps the loop logs ``trigger=1``; a threshold rule on
``trigger`` makes the agent send a harmless command (``scale_clip`` by 1.0). From the run's
``events.jsonl`` we read, per command: the step and time of the triggering record, when the
agent decided, and the step and time at which the probe applied it. Every 50th step the
loss is made NaN: the skip-step guard must skip that very step.

    python benchmarks/rule_latency.py                  # 1 process, then 2 ranks (torchrun, gloo)
    python benchmarks/rule_latency.py --ranks 1 --steps 400

Target (issue #3): agent-side rules applied within 2 steps at 20 steps/s; guards at the same step.
Results: stdout (Markdown) and benchmarks/results/rule_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

RULES = """
guards:
  clip: {scheme: fixed, max_norm: 1000.0}
rules:
  - name: trigger
    metric: trigger
    detect: {type: threshold, above: 0.5}
    action: {type: scale_clip, factor: 1.0}
    mode: act
"""


def worker(args: argparse.Namespace) -> None:
    import torch

    import gradwatch

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradwatch.attach(model, optimizer, run=args.run_name, rules=args.rules)
    period = 1.0 / args.rate
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(16, 32)
        loss = model(x).pow(2).mean()
        if step % 50 == 0:
            loss = loss * float("nan")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        probe.log(loss=loss, trigger=1.0 if step % args.every == 0 else 0.0)
        time.sleep(max(0.0, start + step * period - time.perf_counter()))
    probe.close()
    if distributed:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), q in (0, 1)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def measure(ranks: int, steps: int, rate: float, every: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="gradwatch-latency-"))
    rules = home / "rules.yaml"
    rules.write_text(RULES)
    env = {**os.environ, "GRADWATCH_HOME": str(home), "GRADWATCH_AUTOSTART": "0"}
    port = _free_port()
    agent = subprocess.Popen([sys.executable, "-m", "gradwatch", "agent", "--port", str(port), "--log-level", "warning"],
                             env=env, stdin=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        cmd = [__file__, "--worker", "--run-name", "bench", "--rules", str(rules), "--steps", str(steps), "--rate", str(rate),
               "--every", str(every)]
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                   str(_free_port()), *cmd]
        else:
            cmd = [sys.executable, *cmd]
        subprocess.run(cmd, env=env, check=True)
        time.sleep(1.0)  # let the agent ingest the last acks
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
    events = [json.loads(line) for line in (home / "runs" / "bench" / "events.jsonl").read_text().splitlines()]
    decisions = {e["id"]: e for e in events if e["event"] == "decision"}
    acks = [e for e in events if e["event"] == "ack"]
    step_latency, ms_latency, decide_ms, same_step = [], [], [], []
    by_command: dict[str, set[int]] = {}
    for ack in acks:
        d = decisions[ack["command"]]
        step_latency.append(ack["step"] - d["step"])
        ms_latency.append((ack["t"] - d["t"]) * 1000)
        by_command.setdefault(ack["command"], set()).add(ack["step"])
    for d in decisions.values():
        decide_ms.append((d["t_decided"] - d["t"]) * 1000)
    same_step = [len(s) == 1 for s in by_command.values()]
    skips = [e for e in events if e["event"] == "skip_step"]
    nan_steps = set(range(50, steps + 1, 50))
    records = []
    for rank in range(ranks):
        records += [json.loads(line) for line in (home / "runs" / "bench" / f"rank-{rank}.records.jsonl").read_text().splitlines()]
    skipped_steps = {r["step"] for r in records if r.get("kind") == "step" and r.get("skip") == "nonfinite"}
    return {
        "ranks": ranks, "rate": rate, "steps": steps, "commands": len(decisions), "acks": len(acks),
        "late": sum(a["status"] == "late" for a in acks),
        "all_ranks_same_step": all(same_step) if ranks > 1 else None,
        "steps_p50": _percentile(step_latency, 0.5), "steps_p99": _percentile(step_latency, 0.99),
        "steps_max": max(step_latency), "ms_p50": _percentile(ms_latency, 0.5), "ms_p99": _percentile(ms_latency, 0.99),
        "decide_ms_p50": _percentile(decide_ms, 0.5), "decide_ms_p99": _percentile(decide_ms, 0.99),
        "within_2_steps": sum(s <= 2 for s in step_latency) / len(step_latency),
        "guard_nan_steps": len(nan_steps), "guard_skipped_at_same_step": len(nan_steps & skipped_steps),
        "skip_events": len(skips),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-name", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--rules", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rate", type=float, default=20.0, help="training steps per second")
    parser.add_argument("--every", type=int, default=10, help="a trigger every N steps")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = [measure(r, args.steps, args.rate, args.every) for r in args.ranks]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}\n")
    print("| ranks | commands | applied within 2 steps | steps p50 / p99 / max | ms p50 / p99 | agent decides, ms p50 / p99 "
          "| late | same step on all ranks | NaN steps skipped at that step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = "-" if r["all_ranks_same_step"] is None else ("yes" if r["all_ranks_same_step"] else "NO")
        print(f"| {r['ranks']} | {r['commands']} | {r['within_2_steps']:.0%} | {r['steps_p50']:.0f} / "
              f"{r['steps_p99']:.0f} / {r['steps_max']} | {r['ms_p50']:.0f} / {r['ms_p99']:.0f} | "
              f"{r['decide_ms_p50']:.0f} / {r['decide_ms_p99']:.0f} | {r['late']} | {same} | "
              f"{r['guard_skipped_at_same_step']}/{r['guard_nan_steps']} |")
    out = Path(__file__).parent / "results" / "rule_latency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
