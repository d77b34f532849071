"""A plain PyTorch training loop with no gradwatch in it. Watch it without changing a line:

    gradwatch run -- python examples/plain_loop.py

(Or add one line yourself: ``probe = gradwatch.attach(model, optimizer)``, then
``probe.log(loss=loss)`` each step; see the README.)
"""

import argparse

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
teacher = torch.nn.Linear(32, 10)

for step in range(args.steps):
    x = torch.randn(64, 32)
    y = teacher(x).argmax(dim=1)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    scheduler.step()
    if step % 100 == 0:
        print(f"step {step} loss {loss.item():.3f}")
