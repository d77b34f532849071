"""A Lightning run that overfits, as it happens to people: a big MLP on a tiny training set with noisy labels,
validated on fresh samples every 20 epochs, the losses logged with ``self.log`` and gradwatch's callback watching.

    python lightning_overfit.py [--epochs 400]

One optimizer step per epoch (16 samples, batch 16), so a validation every 20 steps.
"""

import argparse

import lightning.pytorch as pl
import torch

from gradwatch.probes.lightning import GradwatchCallback


class Memoriser(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                       torch.nn.ReLU(), torch.nn.Linear(256, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=400)
    args = ap.parse_args()
    pl.seed_everything(0, verbose=False)
    teacher = torch.randn(16, 1)
    train_x = torch.randn(16, 16)
    train_y = torch.tanh(train_x @ teacher) + 0.3 * torch.randn(16, 1)  # noisy labels: memorising them hurts
    val_x = torch.randn(256, 16)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_x, train_y), batch_size=16)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(val_x, torch.tanh(val_x @ teacher)),
                                      batch_size=256)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, check_val_every_n_epoch=20, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[GradwatchCallback(run="overfit", layer_stats_every=10)])
    trainer.fit(Memoriser(), train, val)


if __name__ == "__main__":
    main()
