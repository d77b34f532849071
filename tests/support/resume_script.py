"""A plain training loop that checkpoints and resumes the way people write one (run as a subprocess).

Regression with SGD + momentum and a StepLR schedule; every ``--val-every`` steps it logs ``val_loss``;
every ``--checkpoint-every`` steps it saves model, optimizer, scheduler, the step and the probe's state
into one ``torch.save`` file. ``--resume`` loads that file and goes on after its step (the probe
continues the run). ``--preempt-at`` ends the process there with SIGTERM, as a scheduler preempting
the job does. Writes each step's LR and loss to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch

import gradwatch


def batch(step: int, teacher: torch.nn.Module, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.Generator().manual_seed(step)  # the same batch at the same step, resumed or not
    x = torch.randn(n, 8, generator=data)
    with torch.no_grad():
        return x, teacher(x) + 0.3 * torch.randn(n, 1, generator=data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-name", default="resumed")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rules", default=None)
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--resume-step-only", action="store_true", help="resume with attach(resume=step)")
    parser.add_argument("--preempt-at", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--result", default="")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x_val, y_val = batch(10**6, teacher, 256)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=120, gamma=0.5)
    start = 0
    resume: dict | int | None = None
    if args.resume:
        saved = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start = saved["step"]
        resume = start if args.resume_step_only else saved["gradwatch"]
    probe = gradwatch.attach(model, optimizer, run=args.run_name, rules=args.rules, resume=resume)
    lrs: dict[int, float] = {}
    losses: dict[int, float] = {}
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step, teacher)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        values = {"loss": loss}
        if step % args.val_every == 0:
            with torch.no_grad():
                values["val_loss"] = torch.nn.functional.mse_loss(model(x_val), y_val)
        probe.log(**values)
        lrs[step], losses[step] = probe.learning_rates()[0], loss.item()  # the next update's, gradwatch's cuts in
        if step % args.checkpoint_every == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "gradwatch": probe.state_dict()},
                       args.checkpoint)
        if args.sleep:
            time.sleep(args.sleep)
        if args.result:
            with open(args.result, "w") as f:
                json.dump({"steps": probe.step, "run": probe.run, "lrs": lrs, "losses": losses}, f)
        if step == args.preempt_at:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # SIGTERM ends the process before this returns
    probe.close()


if __name__ == "__main__":
    main()
