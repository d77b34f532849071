"""FSDP2 (``fully_shard``) on CPU with gloo, under torchrun, in the shape of torchtitan's loop: each layer and
the model sharded, AdamW, and ``clip_grad_norm_`` on the sharded parameters (torch all-reduces the norm and
returns it as a replicated DTensor).

    torchrun --nproc-per-node 2 fsdp2.py OUT_DIR [--no-clip] [--attach] [--steps 6]

Writes ``OUT_DIR/reference-<rank>.json``: the global gradient norm of each step (``full_tensor()``), and each
layer's gradient norm and update/weight ratio, from the full tensors.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--attach", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = None
    if args.attach:
        import gradwatch

        probe = gradwatch.attach(model, optimizer)
    torch.manual_seed(1 + rank)
    norms, layer_norms, ratios = [], [], []
    layers = {name.rpartition(".")[0]: [] for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        layers[name.rpartition(".")[0]].append(p)

    def full_norm(tensors):
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.full_tensor()) for t in tensors])))

    for _ in range(args.steps):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        layer_norms.append({name: full_norm([p.grad for p in ps]) for name, ps in layers.items()})
        weights = {name: [p.detach().clone() for p in ps] for name, ps in layers.items()}
        if args.no_clip:
            total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        else:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        norms.append(float(total.full_tensor()))
        optimizer.step()
        ratios.append({name: full_norm([p.detach() - w for p, w in zip(layers[name], ws, strict=True)]) / full_norm(ws)
                       for name, ws in weights.items()})
        optimizer.zero_grad()
        if probe is not None:
            probe.log(loss=loss)
    if probe is not None:
        probe.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"reference-{rank}.json").write_text(json.dumps({"grad_norm": norms, "layer_grad_norm": layer_norms,
                                                                        "update_ratio": ratios}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
