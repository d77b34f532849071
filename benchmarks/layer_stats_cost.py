"""Cost of the per-layer statistics (probes/layerstats.py) on the training thread: the extra
work of one sampled step, and that cost spread over ``layer_stats_every`` steps.

    python benchmarks/layer_stats_cost.py [--every 100] [--repeats 30]

Workload: a 4-layer TransformerEncoder (d_model 256, seq 128, batch 16, AdamW) on CPU, the
transformer workload of probe_overhead.py. Target: the amortised cost stays under 0.1 % of a
step at the default ``every=100``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradwatch.probes.layerstats import LayerStats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stats = LayerStats(model, optimizer, every=1)
    x = torch.randn(16, 128, 256)
    steps, extra = [], []
    for i in range(args.repeats + 3):
        t0 = time.perf_counter()
        model(x).pow(2).mean().backward()
        t1 = time.perf_counter()
        stats.before_step()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        item = stats.after_step(i, 0.0)
        item[4].resolve()  # the writer thread's part, timed here only to show it is small
        t4 = time.perf_counter()
        optimizer.zero_grad()
        if i >= 3:  # warm-up
            steps.append((t1 - t0) + (t3 - t2))
            extra.append((t2 - t1) + (t4 - t3))
    step, cost = statistics.median(steps), statistics.median(extra)
    params = sum(p.numel() for p in model.parameters())
    print(f"| model | params | layers | step (median) | sampled-step extra | amortised over {args.every} steps |")
    print("|---|---|---|---|---|---|")
    print(f"| TransformerEncoder 4x256 | {params / 1e6:.1f} M | {len(item[3])} | {step * 1e3:.1f} ms | "
          f"{cost * 1e3:.2f} ms ({cost / step:.1%}) | {cost / args.every / step:.3%} |")


if __name__ == "__main__":
    main()
