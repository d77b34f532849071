"""A GAN loop in the shape of PyTorch's DCGAN example (small MLPs instead of convolutions): the
discriminator steps on a real and a detached fake batch, then the generator steps on the
discriminator's verdict on the same fake batch; two Adam optimizers, created D first.

    python gan.py OUT_DIR [--steps 30] [--attach] [--clip] [--sleep S]

Writes ``OUT_DIR/reference.json``: each network's gradient norm right before its optimizer's step (its
own parameters only) and its loss (errD = errD_real + errD_fake, errG). With ``--attach`` it attaches
gradwatch itself and logs errD as the loss; otherwise run it under ``gradwatch run``.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn


def total_norm(module):
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--attach", action="store_true")
    ap.add_argument("--clip", action="store_true", help="clip each network's gradients to 0.5 before its step")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per iteration (for commands to arrive)")
    args = ap.parse_args()
    torch.manual_seed(0)
    netG = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 8))
    netD = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1), nn.Sigmoid())
    criterion = nn.BCELoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    probe = None
    if args.attach:
        import gradwatch

        probe = gradwatch.attach(None, [optimizerD, optimizerG])
    ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
    ref = {"d_norm": [], "g_norm": [], "errD": [], "errG": []}
    for _ in range(args.steps):
        real = torch.randn(16, 8) * 0.5 + 1.0
        netD.zero_grad()
        errD_real = criterion(netD(real), ones)
        errD_real.backward()
        fake = netG(torch.randn(16, 4))
        errD_fake = criterion(netD(fake.detach()), zeros)
        errD_fake.backward()
        ref["d_norm"].append(total_norm(netD))
        if args.clip:
            torch.nn.utils.clip_grad_norm_(netD.parameters(), 0.5)
        optimizerD.step()
        netG.zero_grad()
        errG = criterion(netD(fake), ones)
        errG.backward()
        ref["g_norm"].append(total_norm(netG))
        if args.clip:
            torch.nn.utils.clip_grad_norm_(netG.parameters(), 0.5)
        optimizerG.step()
        ref["errD"].append((errD_real + errD_fake).item())
        ref["errG"].append(errG.item())
        if probe is not None:
            probe.log(loss=errD_real + errD_fake, loss_G=errG)
        time.sleep(args.sleep)
    if probe is not None:
        probe.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reference.json").write_text(json.dumps(ref))


if __name__ == "__main__":
    main()
