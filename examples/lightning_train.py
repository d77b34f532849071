"""PyTorch Lightning with gradwatch's callback (one line: ``callbacks=[GradwatchCallback()]``).

    python examples/lightning_train.py
    gradwatch run -- python examples/lightning_train.py      # same, plus --run/--rules from the CLI

The callback measures where Lightning defines the points (it runs the backward pass inside
``optimizer.step``); stop, LR and clipping actions go through the Trainer.
"""

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from gradwatch.probes.lightning import GradwatchCallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

torch.manual_seed(0)
x = torch.randn(8192, 32)
data = torch.utils.data.TensorDataset(x, torch.nn.Linear(32, 10)(x).argmax(dim=1))
trainer = pl.Trainer(max_steps=args.steps, accelerator="auto", devices=1, gradient_clip_val=1.0,
                     callbacks=[GradwatchCallback()], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False)
trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=64, shuffle=True))
