"""FSDP1 (``FullyShardedDataParallel``) on CUDA with NCCL, one GPU per rank, the way its tutorial trains: the probe
attached with ``shard_group=model.process_group``; ``model.clip_grad_norm_`` (FSDP's own, which all-reduces)
gives the reference norm. Needs an accelerator: FSDP1 refuses to run on CPU.

    torchrun --nproc-per-node 2 fsdp1.py OUT_DIR [--steps 6]
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel

import gradwatch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(0)
    model = FullyShardedDataParallel(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                                         torch.nn.Linear(256, 1)).cuda())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = gradwatch.attach(model, optimizer, run="fsdp1", shard_group=model.process_group)
    torch.manual_seed(1 + rank)
    norms = []
    for _ in range(args.steps):
        loss = model(torch.randn(32, 64, device="cuda")).pow(2).mean()
        loss.backward()
        norms.append(float(model.clip_grad_norm_(1e9)))
        optimizer.step()
        optimizer.zero_grad()
        probe.log(loss=loss)
    probe.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"reference-{rank}.json").write_text(json.dumps({"grad_norm": norms}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
