"""Probe overhead on the training thread: step time with and without a probe, and one bare
fused gradient-norm pass, interleaved in one run so machine noise hits all three alike.

    python benchmarks/probe_overhead.py                      # both workloads
    python benchmarks/probe_overhead.py --workload mlp --rounds 40

Workloads (CPU):
  mlp          784-128-10 MLP, batch 64, SGD            (about 1 ms a step)
  transformer  4-layer TransformerEncoder, d_model 256, seq 128, batch 16, AdamW

Targets (issue #2): transformer overhead <= 0.5 % of the step; mlp overhead <= 1.5 x the
bare gradient-norm pass. Overhead is reported two ways: the difference of the median step
times (A/B, includes the writer thread's competition for the GIL), and the time spent in
the probe's hooks on the training thread (precise, but excludes the writer thread).
Results go to stdout as a Markdown table and to benchmarks/results/probe_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradwatch.probes.gradnorm import global_grad_norm, gradients
from gradwatch.probes.probe import Probe


class TimedProbe(Probe):
    """A probe that also sums the time spent in its own hooks (the training thread's cost)."""

    hook_seconds = 0.0

    def _timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        fn(*args, **kwargs)
        self.hook_seconds += time.perf_counter() - start

    def _on_forward_pre(self, *args: Any) -> None:
        self._timed(super()._on_forward_pre, *args)

    def _on_step_pre(self, *args: Any) -> None:
        self._timed(super()._on_step_pre, *args)

    def _on_step_post(self, *args: Any) -> None:
        self._timed(super()._on_step_post, *args)

    def log(self, **scalars: Any) -> None:
        self._timed(super().log, **scalars)


@dataclass
class Workload:
    name: str
    build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]]
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    steps_per_block: int
    default_rounds: int


def _mlp() -> tuple[torch.nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    data = [(torch.randn(64, 784), torch.randint(0, 10, (64,))) for _ in range(16)]
    return model, torch.optim.SGD(model.parameters(), lr=0.01), data


def _transformer() -> tuple[torch.nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    layer = torch.nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True, dropout=0.0)
    model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False),
                                _MeanPool(), torch.nn.Linear(256, 10))
    data = [(torch.randn(16, 128, 256), torch.randint(0, 10, (16,))) for _ in range(4)]
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), data


class _MeanPool(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _cross_entropy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


WORKLOADS = {
    "mlp": Workload("mlp", _mlp, _cross_entropy, steps_per_block=100, default_rounds=80),
    "transformer": Workload("transformer", _transformer, _cross_entropy, steps_per_block=5, default_rounds=16),
}


@dataclass
class Samples:
    plain: list[float] = field(default_factory=list)
    probed: list[float] = field(default_factory=list)
    with_norm: list[float] = field(default_factory=list)  # plain step plus one bare fused norm pass
    bare_in_step: list[float] = field(default_factory=list)  # that pass, timed where it runs
    bare_norm: list[float] = field(default_factory=list)  # the pass alone, in a hot loop
    hook_per_step: list[float] = field(default_factory=list)


def _block(model: torch.nn.Module, opt: torch.optim.Optimizer, data: list[Any], loss_fn: Callable[..., torch.Tensor],
           steps: int, probe: Probe | None, out: list[float], bare_norm: list[float] | None = None) -> None:
    for i in range(steps):
        x, y = data[i % len(data)]
        start = time.perf_counter()
        loss = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        if bare_norm is not None:  # one fused norm pass inside a real step, as clip_grad_norm_ would run it
            norm_start = time.perf_counter()
            global_grad_norm(gradients(opt))
            bare_norm.append(time.perf_counter() - norm_start)
        opt.step()
        if probe is not None:
            probe.log(loss=loss, batch_size=len(x))
        out.append(time.perf_counter() - start)


def run_workload(workload: Workload, rounds: int, home: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    plain_model, plain_opt, data = workload.build()
    torch.manual_seed(0)
    probed_model, probed_opt, _ = workload.build()
    torch.manual_seed(0)
    norm_model, norm_opt, _ = workload.build()
    probe = TimedProbe(probed_model, probed_opt, run=f"bench-{workload.name}", home=home, autostart_agent=False,
                       flush_interval=float(os.environ.get("BENCH_FLUSH", "0.05")), max_queue=10**7)
    samples = Samples()
    warm: list[float] = []
    _block(plain_model, plain_opt, data, workload.loss, workload.steps_per_block, None, warm)
    _block(probed_model, probed_opt, data, workload.loss, workload.steps_per_block, probe, warm)
    kinds = ["plain", "with_norm", "probed"]
    for r in range(rounds):
        for kind in kinds[r % 3:] + kinds[: r % 3]:  # rotate the order so no variant always runs first
            if kind == "plain":
                _block(plain_model, plain_opt, data, workload.loss, workload.steps_per_block, None, samples.plain)
            elif kind == "with_norm":
                _block(norm_model, norm_opt, data, workload.loss, workload.steps_per_block, None, samples.with_norm,
                       bare_norm=samples.bare_in_step)
            else:
                before = probe.hook_seconds
                _block(probed_model, probed_opt, data, workload.loss, workload.steps_per_block, probe, samples.probed)
                samples.hook_per_step.append((probe.hook_seconds - before) / workload.steps_per_block)
        grads = gradients(probed_opt)
        for _ in range(workload.steps_per_block):
            start = time.perf_counter()
            global_grad_norm(grads)
            samples.bare_norm.append(time.perf_counter() - start)
        print(f"  {workload.name}: round {r + 1}/{rounds}", file=sys.stderr, end="\r", flush=True)
    print(file=sys.stderr)
    probe.close()
    plain = statistics.median(samples.plain)
    probed = statistics.median(samples.probed)
    with_norm = statistics.median(samples.with_norm)
    bare = statistics.median(samples.bare_norm)
    hook = statistics.median(samples.hook_per_step)
    # Paired per-round differences: each round's variants ran back to back, so slow drifts of
    # the machine cancel; the median over rounds is the estimate, the IQR its spread.
    overhead_rounds = _round_diffs(samples.probed, samples.plain, workload.steps_per_block)
    bare_rounds = _round_diffs(samples.with_norm, samples.plain, workload.steps_per_block)
    overhead = statistics.median(overhead_rounds)
    bare_in_step = statistics.median(bare_rounds)
    bare_direct = statistics.median(samples.bare_in_step)
    return {
        "workload": workload.name,
        "rounds": rounds,
        "steps_per_variant": len(samples.plain),
        "params": sum(p.numel() for p in plain_model.parameters()),
        "step_plain_s": plain,
        "step_probed_s": probed,
        "ab_overhead_s": overhead,
        "ab_overhead_pct": 100 * overhead / plain,
        "ab_round_iqr_s": _iqr(overhead_rounds),
        "bare_round_iqr_s": _iqr(bare_rounds),
        "hook_time_per_step_s": hook,
        "hook_time_pct": 100 * hook / plain,
        "step_with_bare_norm_s": with_norm,
        "bare_norm_in_step_s": bare_in_step,
        "bare_norm_hot_loop_s": bare,
        "ab_overhead_over_bare_norm": overhead / bare_in_step,
        "bare_norm_in_step_direct_s": bare_direct,
        "hook_time_over_bare_norm": hook / bare_direct,
        "hook_time_beyond_bare_norm_pct": 100 * (hook - bare_direct) / plain,
        "dropped": probe.dropped,
    }


def _round_diffs(a: list[float], b: list[float], block: int) -> list[float]:
    return [statistics.median(a[i:i + block]) - statistics.median(b[i:i + block]) for i in range(0, len(a), block)]


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if abs(seconds) < 0.01 else f"{seconds * 1e3:,.2f} ms"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | params | step, no probe | step, probe | probe overhead (paired, ±IQR/2) "
        "| hooks, timed inside (% of step) | bare norm pass: A/B ±IQR/2, timed inside, hot loop "
        "| overhead ÷ bare (A/B) | hooks ÷ bare (timed inside) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        # A/B of medians cannot resolve an effect smaller than its spread across rounds: say so.
        resolved = abs(r["bare_norm_in_step_s"]) > r["bare_round_iqr_s"] / 2
        ratio = f"{r['ab_overhead_over_bare_norm']:.2f}" if resolved else "not resolved by A/B"
        lines.append(
            f"| {r['workload']} | {r['params']:,} | {_fmt_us(r['step_plain_s'])} | {_fmt_us(r['step_probed_s'])} | "
            f"{_fmt_us(r['ab_overhead_s'])} = {r['ab_overhead_pct']:.2f} % (±{_fmt_us(r['ab_round_iqr_s'] / 2)}) | "
            f"{_fmt_us(r['hook_time_per_step_s'])} = {r['hook_time_pct']:.3f} % | "
            f"{_fmt_us(r['bare_norm_in_step_s'])} ±{_fmt_us(r['bare_round_iqr_s'] / 2)}, "
            f"{_fmt_us(r['bare_norm_in_step_direct_s'])}, {_fmt_us(r['bare_norm_hot_loop_s'])} | "
            f"{ratio} | {r['hook_time_over_bare_norm']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default per workload)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "probe_overhead.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    with tempfile.TemporaryDirectory() as home:
        results = [run_workload(WORKLOADS[n], args.rounds or WORKLOADS[n].default_rounds, Path(home)) for n in names]
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    print(f"environment: {env}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
