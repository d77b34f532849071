"""A GAN under Lightning's manual optimization, in the shape of Lightning's own GAN example: two optimizers
from ``configure_optimizers``, ``automatic_optimization = False``, ``manual_backward`` and
``toggle_optimizer``; the discriminator steps, then the generator.

    python lightning_gan.py OUT_DIR [--steps 20]

Writes ``OUT_DIR/reference.json``: each network's gradient norm right before its optimizer's step and its
loss, per training batch. Uses gradwatch's Lightning callback.
"""

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn

from gradwatch.probes.lightning import GradwatchCallback


def total_norm(module):
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class GAN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1), nn.Sigmoid())
        self.reference = {"d_norm": [], "g_norm": [], "errD": [], "errG": []}

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_d, opt_g = self.optimizers()
        criterion = nn.BCELoss()
        ones, zeros = torch.ones(real.size(0), 1), torch.zeros(real.size(0), 1)
        fake = self.generator(torch.randn(real.size(0), 4))

        self.toggle_optimizer(opt_d)
        err_d = criterion(self.discriminator(real), ones) + criterion(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(err_d)
        self.reference["d_norm"].append(total_norm(self.discriminator))
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        self.toggle_optimizer(opt_g)
        err_g = criterion(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(err_g)
        self.reference["g_norm"].append(total_norm(self.generator))
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.reference["errD"].append(err_d.item())
        self.reference["errG"].append(err_g.item())
        self.log_dict({"d_loss": err_d, "g_loss": err_g})

    def configure_optimizers(self):
        return [torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
                torch.optim.Adam(self.generator.parameters(), lr=1e-4, betas=(0.5, 0.999))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    pl.seed_everything(0, verbose=False)
    data = torch.utils.data.TensorDataset(torch.randn(512, 8) * 0.5 + 1.0)
    module = GAN()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2 * args.steps, logger=False,
                         callbacks=[GradwatchCallback(run="lightning-gan", layer_stats_every=0)],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reference.json").write_text(json.dumps(module.reference))


if __name__ == "__main__":
    main()
