"""A Lightning run that validates every epoch and stops with Lightning's own ``EarlyStopping``, with
gradwatch's callback watching: the validation metric follows a given sequence (one value per epoch), so
that its improvements land exactly on ``min_delta``.

    python lightning_validation.py OUT_DIR --namespace lightning|pytorch_lightning --mode max
        --min-delta 0.1 --patience 2 --values 0.0,0.1,0.2,... [--rules FILE]

Writes ``OUT_DIR/result.json``: the epoch Lightning stopped at, the global step of each validation.
"""

import argparse
import json
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--namespace", choices=["lightning", "pytorch_lightning"], default="lightning")
    ap.add_argument("--mode", default="max")
    ap.add_argument("--min-delta", type=float, default=0.1)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--values", required=True)
    ap.add_argument("--rules")
    ap.add_argument("--score-name", default="val_score", help="the name the sequence is logged under")
    args = ap.parse_args()
    if args.namespace == "lightning":
        import lightning.pytorch as pl

        from gradwatch.probes.lightning import GradwatchCallback
    else:
        import pytorch_lightning as pl

        from gradwatch.probes.pytorch_lightning import GradwatchCallback
    values = [float(v) for v in args.values.split(",")]
    steps_at = []

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            if args.score_name != "val_loss":
                self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def on_validation_epoch_end(self):
            if self.trainer.sanity_checking:
                return
            epoch = self.current_epoch
            self.log(args.score_name, values[min(epoch, len(values) - 1)])
            steps_at.append(self.global_step)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    pl.seed_everything(0, verbose=False)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    train = torch.utils.data.DataLoader(data, batch_size=16)  # 4 steps an epoch
    val = torch.utils.data.DataLoader(data, batch_size=32)
    stopper = pl.callbacks.EarlyStopping(monitor=args.score_name, mode=args.mode, min_delta=args.min_delta,
                                         patience=args.patience)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=len(values), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[stopper, GradwatchCallback(run="validation", rules=args.rules)])
    trainer.fit(Model(), train, val)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "result.json").write_text(json.dumps(
        {"stopped_epoch": stopper.stopped_epoch, "steps_at": steps_at}))


if __name__ == "__main__":
    main()
