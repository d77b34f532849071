"""An unmodified DistributedDataParallel script. Watch every rank without changing a line:

    gradwatch run -- torchrun --nproc-per-node 2 examples/torchrun_ddp.py

Rank and world size come from torchrun's environment; all ranks join one run, and the gradient
norm each records is the global one (DDP has averaged the gradients).
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank = dist.get_rank()
device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
torch.manual_seed(0)  # the same initial weights on every rank
model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                                    torch.nn.Linear(64, 1)).to(device))
optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
torch.manual_seed(1 + rank)  # each rank its own data

for step in range(args.steps):
    x = torch.randn(32, 32, device=device)
    loss = F.mse_loss(model(x), x[:, :1] * 3)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if rank == 0 and step % 50 == 0:
        print(f"step {step} loss {loss.item():.3f}")

dist.destroy_process_group()
