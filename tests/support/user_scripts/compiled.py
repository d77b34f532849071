"""A small GPT trained with ``torch.compile`` as nanoGPT does it (``model = torch.compile(model)`` before
the loop, AdamW, hand-set warm-up LR, ``clip_grad_norm_``). Counts what torch compiled.

    python compiled.py OUT_DIR [--steps 8] [--backend eager|aot_eager|inductor]

Writes ``OUT_DIR/compile.json``: torch's own dynamo counters (frames compiled, unique graphs,
recompilations) and the loss of each step.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
from torch._dynamo.utils import counters


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=64, dim=32, heads=2, layers=2, block=16):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(block, block, dtype=torch.bool), 1))

    def forward(self, idx, targets):
        t = idx.size(1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        logits = self.head(x)
        return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--backend", default="eager")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model = torch.compile(model, backend=args.backend)
    losses = []
    for it in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (it + 1) / 4)
        idx = torch.randint(0, 64, (4, 16))
        loss = model(idx, torch.roll(idx, -1, 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile.json").write_text(json.dumps({
        "frames_ok": counters["frames"]["ok"], "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
        "counters": {k: dict(v) for k, v in counters.items()}, "loss": losses}))


if __name__ == "__main__":
    main()
