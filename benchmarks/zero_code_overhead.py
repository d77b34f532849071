"""Step time of one training script run three ways, interleaved so machine noise hits all alike:
bare (no gradwatch), under ``gradwatch run`` (zero-code: global hooks, the backward and clip
wrappers), and with ``gradwatch.attach`` + ``probe.log(loss=...)`` in the script.

    python benchmarks/zero_code_overhead.py                    # both workloads
    python benchmarks/zero_code_overhead.py --workload mlp --rounds 7

Each run is a fresh process that times its own steps (perf_counter around each step, the first
20% dropped as warm-up) and reports the median. The table gives, per way, the median over rounds
of those medians and the difference to bare. Results: stdout (Markdown) and
benchmarks/results/zero_code_overhead.json.
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

import torch

SCRIPT = r'''
import json, os, statistics, sys, time
import torch
import torch.nn.functional as F
workload, steps, mode, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
if workload == "mlp":
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [(torch.randn(64, 784), torch.randint(0, 10, (64,))) for _ in range(16)]
    loss_fn = lambda x, y: F.cross_entropy(model(x), y)
else:
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
    model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 4), torch.nn.Linear(256, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = [(torch.randn(8, 64, 256), torch.randn(8, 64, 256)) for _ in range(4)]
    loss_fn = lambda x, y: F.mse_loss(model(x), y)
probe = None
if mode == "attach":
    import gradwatch
    probe = gradwatch.attach(model, opt, run="bench-attach")
times = []
for i in range(steps):
    x, y = data[i % len(data)]
    t0 = time.perf_counter()
    loss = loss_fn(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if probe is not None:
        probe.log(loss=loss, batch_size=len(x))
    times.append(time.perf_counter() - t0)
json.dump({"median": statistics.median(times[steps // 5:])}, open(out, "w"))
'''

WORKLOADS = {"mlp": 3000, "transformer": 120}  # steps per run
MODES = ("bare", "zero-code", "attach")


def one_run(workload: str, steps: int, mode: str, workdir: Path, home: Path) -> float:
    script = workdir / "bench_train.py"
    out = workdir / f"{mode}.json"
    command = [sys.executable, str(script), workload, str(steps), mode, str(out)]
    if mode == "zero-code":
        command = [sys.executable, "-m", "gradwatch", "run", "-q", "--run", "bench-zero-code", "--", *command]
    env = {**os.environ, "GRADWATCH_HOME": str(home), "GRADWATCH_AUTOSTART": "0"}
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=900)
    return float(json.loads(out.read_text())["median"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "zero_code_overhead.json")
    args = parser.parse_args()
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "bench_train.py").write_text(SCRIPT)
        for workload in workloads:
            medians: dict[str, list[float]] = {mode: [] for mode in MODES}
            for r in range(args.rounds):
                for mode in MODES:
                    medians[mode].append(one_run(workload, WORKLOADS[workload], mode, workdir, workdir / f"home-{r}"))
                print(f"{workload} round {r + 1}/{args.rounds}: "
                      + ", ".join(f"{m} {medians[m][-1] * 1e6:.0f} µs" for m in MODES), file=sys.stderr)
            summary = {mode: statistics.median(values) for mode, values in medians.items()}
            results.append({"workload": workload, "steps": WORKLOADS[workload], "rounds": args.rounds,
                            "median_step_s": summary, "per_round_s": medians})
    print("| workload | bare | gradwatch run | vs bare | attach + log | vs bare |")
    print("|---|---|---|---|---|---|")
    for r in results:
        m = r["median_step_s"]
        print(f"| {r['workload']} | {m['bare'] * 1e6:,.0f} µs | {m['zero-code'] * 1e6:,.0f} µs | "
              f"{(m['zero-code'] / m['bare'] - 1) * 100:+.2f} % | {m['attach'] * 1e6:,.0f} µs | "
              f"{(m['attach'] / m['bare'] - 1) * 100:+.2f} % |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                                "cpus": os.cpu_count()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
