"""A small Lightning run with gradwatch's callback, logging what Lightning itself logs (CSVLogger):
the training loss, the total gradient norm (lightning's ``grad_norm`` utility) and the learning
rate (LearningRateMonitor). Random data, a tiny random model: nothing is downloaded.

    python lightning_script.py OUT_DIR [--devices N] [--accumulate K] [--steps N] [--rules FILE]
                               [--clip-val V] [--sleep S]
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import grad_norm

from gradwatch.probes.lightning import GradwatchCallback


class Regressor(pl.LightningModule):
    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.sleep = sleep

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        time.sleep(self.sleep)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.log("grad_norm", grad_norm(self, norm_type=2)["grad_2.0_norm_total"], on_step=True, on_epoch=False)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class CtrlC(pl.Callback):
    """A person pressing Ctrl-C during training (0: never)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def __bool__(self) -> bool:
        return bool(self.at_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGINT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rules")
    ap.add_argument("--clip-val", type=float)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--run", default="lightning")
    ap.add_argument("--no-callback", action="store_true", help="an unmodified script, for `gradwatch run`")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="ModelCheckpoint every N training steps")
    ap.add_argument("--resume", default=None, help="fit(ckpt_path=...): a checkpoint file, or 'last'")
    ap.add_argument("--ctrl-c-at", type=int, default=0, help="press Ctrl-C (SIGINT) after this step")
    a = ap.parse_args()

    pl.seed_everything(7, verbose=False)
    x = torch.randn(4096, 16)
    data = torch.utils.data.TensorDataset(x, x[:, :1] * 2 + 0.1 * torch.randn(4096, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    callback = None if a.no_callback else GradwatchCallback(run=a.run, rules=a.rules, layer_stats_every=10)
    checkpoints = ModelCheckpoint(dirpath=Path(a.out) / "ckpt", every_n_train_steps=a.checkpoint_every, save_top_k=-1,
                                  save_last=True) if a.checkpoint_every else None
    trainer = pl.Trainer(
        accelerator="cpu", devices=a.devices, strategy="ddp" if a.devices > 1 else "auto", max_steps=a.steps,
        accumulate_grad_batches=a.accumulate, gradient_clip_val=a.clip_val, log_every_n_steps=1,
        logger=CSVLogger(a.out, name="csv", version=0),
        callbacks=[c for c in (callback, LearningRateMonitor("step"), checkpoints, CtrlC(a.ctrl_c_at)) if c],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpoints is not None,
    )
    module = Regressor(a.sleep)
    trainer.fit(module, loader, ckpt_path=a.resume)
    if trainer.global_rank == 0:
        opt = trainer.optimizers[0]
        (Path(a.out) / "result.json").write_text(json.dumps({
            "global_step": trainer.global_step, "should_stop": trainer.should_stop,
            "gradient_clip_val": trainer.gradient_clip_val, "lr": opt.param_groups[0]["lr"],
            "base_lrs": trainer.lr_scheduler_configs[0].scheduler.base_lrs,
            "stop_reason": callback.probe.stop_reason if callback else None,
            "run": callback.probe.run if callback else None,
        }))


if __name__ == "__main__":
    main()
