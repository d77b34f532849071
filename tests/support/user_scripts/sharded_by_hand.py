"""Gradients sharded over two gloo ranks by hand, as ZeRO-2 shards them: every rank runs the whole model, the
gradients are averaged, then each rank keeps only its own parameters' gradients and updates those, and the
owners broadcast the new weights. A norm over what one rank holds is its shard's; ``shard_group`` makes it the
model's.

    torchrun --nproc-per-node 2 sharded_by_hand.py OUT_DIR [--shard-group] [--clip MAX_NORM] [--steps 8]

Writes ``OUT_DIR/reference-<rank>.json``: each step's norm over all the model's gradients, and the factor the
rank's own gradients were scaled by during ``step()`` (1.0: not clipped).
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

import gradwatch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shard-group", action="store_true")
    ap.add_argument("--clip", type=float)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 1))
    params = list(model.parameters())
    owner = {id(p): i % world for i, p in enumerate(params)}
    mine = [p for p in params if owner[id(p)] == rank]
    optimizer = torch.optim.SGD(mine, lr=0.05)
    rules = {"guards": {"clip": {"scheme": "fixed", "max_norm": args.clip}}} if args.clip else None
    probe = gradwatch.attach(model, optimizer, run="sharded", rules=rules,
                             shard_group=dist.group.WORLD if args.shard_group else None)
    torch.manual_seed(1 + rank)
    norms, factors = [], []
    for _ in range(args.steps):
        x = torch.randn(16, 16)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        for p in params:
            p.grad = None
        loss.backward()
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))))
        for p in params:
            if owner[id(p)] != rank:
                p.grad = None  # another rank's shard
        before = [p.grad.clone() for p in mine]
        optimizer.step()
        factors.append(float(mine[0].grad.flatten()[0] / before[0].flatten()[0]))
        with torch.no_grad():
            for p in params:
                dist.broadcast(p, src=owner[id(p)])
        probe.log(loss=loss)
    probe.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"reference-{rank}.json").write_text(json.dumps({"grad_norm": norms, "factor": factors}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
