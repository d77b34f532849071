"""Where the probe's overhead goes, on the tiny MLP: each variant adds one piece, all
interleaved in one run and compared with the plain step round by round (paired).

    python benchmarks/probe_ablation.py [--rounds 60]

Variants: no-op hooks (the cost of torch calling three hooks), the fused norm in a pre-step
hook, the full probe with its writer never writing, the full probe.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from probe_overhead import WORKLOADS, _block

from gradwatch.probes.gradnorm import global_grad_norm, gradients
from gradwatch.probes.probe import Probe


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _norm_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global_grad_norm(gradients(optimizer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps-per-block", type=int, default=100)
    args = parser.parse_args()
    workload = WORKLOADS["mlp"]
    home = Path(tempfile.mkdtemp())

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, list[Any]]:
        torch.manual_seed(0)
        return workload.build()

    variants: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, Probe | None]] = {}
    model, opt, data = build()
    variants["plain"] = (model, opt, None)
    model, opt, _ = build()
    opt.register_step_pre_hook(_noop)
    opt.register_step_post_hook(_noop)
    model.register_forward_pre_hook(_noop)
    variants["three no-op hooks"] = (model, opt, None)
    model, opt, _ = build()
    opt.register_step_pre_hook(_norm_hook)
    variants["fused norm in a pre-step hook"] = (model, opt, None)
    model, opt, _ = build()
    variants["probe, writer never writes"] = (model, opt, Probe(model, opt, run="a", home=home, autostart_agent=False,
                                                                flush_interval=3600, max_queue=1))
    model, opt, _ = build()
    variants["probe"] = (model, opt, Probe(model, opt, run="b", home=home, autostart_agent=False))

    names = list(variants)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            model, opt, probe = variants[name]
            times: list[float] = []
            _block(model, opt, data, workload.loss, args.steps_per_block, probe, times)
            medians[name].append(statistics.median(times))
    print(f"plain step: {statistics.median(medians['plain']) * 1e6:,.0f} µs (median of {args.rounds} rounds)\n")
    print("| variant | added to the step (median of paired rounds) | IQR |")
    print("|---|---|---|")
    for name in names[1:]:
        diffs = [a - b for a, b in zip(medians[name], medians["plain"], strict=True)]
        q = statistics.quantiles(diffs, n=4)
        print(f"| {name} | {statistics.median(diffs) * 1e6:,.0f} µs | {q[0] * 1e6:,.0f} … {q[2] * 1e6:,.0f} µs |")
    for _, _, probe in variants.values():
        if probe is not None:
            probe.close()


if __name__ == "__main__":
    main()
