"""Cost of the activation statistics (probes/activations.py) on the training thread at a sampled step, against
the per-layer statistics' cost at the same step (target, issue 21: at most 2x).

    python benchmarks/activation_stats_cost.py [--repeats 30]

Workloads, on CPU: the MLP of step_cost.py (784-128-10, ReLU, batch 64, SGD) and the 4-layer TransformerEncoder of
layer_stats_cost.py (d_model 256, seq 128, batch 16, AdamW) with a GELU module as its activation (the default,
F.relu, is a function: nothing to hook). Each repeat runs a plain step and a step with the activation hooks armed
(arm, forward, backward, disarm: the hooks' counting and the vector's assembly), alternating, and the layer
statistics' before/after-step work; the cost is the median of (hooked - plain) and of the layer statistics' extra.
Unsampled steps have no hooks: they cost nothing more.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gradwatch.probes.activations import ActivationStats
from gradwatch.probes.layerstats import LayerStats


def _mlp() -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]]:
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    return model, torch.optim.SGD(model.parameters(), lr=0.01), lambda: torch.nn.functional.cross_entropy(model(x), y)


def _transformer() -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]]:
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, activation=torch.nn.GELU())
    model = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    x = torch.randn(16, 128, 256)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), lambda: model(x).pow(2).mean()


def measure(make: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]]],
            repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, optimizer, loss_of = make()
    layers = LayerStats(model, optimizer, every=1)
    activations = ActivationStats(model)
    plain, hooked, layer_extra = [], [], []
    for i in range(repeats + 3):
        for armed in (False, True):
            t0 = time.perf_counter()
            if armed:
                activations.arm()
            loss_of().backward()
            if armed:
                capture = activations.disarm(i, 0.0)
                assert capture is not None
                capture.vector.resolve()  # the writer's part, timed here only to show it is small
            t1 = time.perf_counter()
            layers.before_step()
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            item = layers.after_step(i, 0.0)
            assert item is not None
            item.vector.resolve()
            t4 = time.perf_counter()
            optimizer.zero_grad()
            if i >= 3:
                (hooked if armed else plain).append(t1 - t0)
                layer_extra.append((t2 - t1) + (t4 - t3))
    step = statistics.median(plain)
    return {"step": step, "activations": statistics.median(hooked) - step, "layers": statistics.median(layer_extra),
            "modules": float(len(capture.modules))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| model | activation modules | forward+backward (median) | sampled step: activation statistics | "
          "sampled step: layer statistics | ratio |")
    print("|---|---|---|---|---|---|")
    for name, make in (("MLP 784-128-10", _mlp), ("TransformerEncoder 4x256, GELU", _transformer)):
        r = measure(make, args.repeats)
        print(f"| {name} | {r['modules']:.0f} | {r['step'] * 1e3:.2f} ms | {r['activations'] * 1e3:.3f} ms "
              f"({r['activations'] / r['step']:.1%}) | {r['layers'] * 1e3:.3f} ms | "
              f"{r['activations'] / r['layers']:.2f}x |")


if __name__ == "__main__":
    main()
