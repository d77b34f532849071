"""An ordinary training script in one of the usual set-ups, with no gradwatch in it. Run under
``gradwatch run``; it writes, per rank, the reference values the test compares gradwatch's with:
torch's own ``clip_grad_norm_`` result on the gradients each optimizer step applies, and the loss.

    python setups_script.py SETUP OUT_DIR [--clip | --clip-value] [--nan-at STEP] [--attach] [--steps N]

SETUP: fp32, amp (GradScaler, explicit unscale_), amp-fused (fused Adam: GradScaler hands the
optimizer scaled gradients), accumulate (4 micro-batches per step), multi-opt (two optimizers,
three param groups), ddp (under torchrun, gloo). --clip: the script clips with clip_grad_norm_
itself (gradwatch should reuse that result, which is the norm before clipping); --clip-value: it
clamps the gradients with clip_grad_value_ (the recorded norm is the one before). --nan-at: the
loss of that step is NaN (GradScaler then skips the step; the reference marks it). --attach: the
script attaches gradwatch itself and logs the loss, instead of running under ``gradwatch run``.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

# torch's clip_grad_norm_ itself, not the wrapper `gradwatch run` puts in front of it: calling it
# for the reference must not hand gradwatch the answer.
torch_clip_grad_norm_ = getattr(torch.nn.utils.clip_grad_norm_, "__wrapped__", torch.nn.utils.clip_grad_norm_)


def reference_norm(params, divide_by=1.0):
    params = [p for p in params if p.grad is not None]
    if divide_by != 1.0:  # norm of the unscaled gradients, computed on copies
        copies = []
        for p in params:
            c = p.detach().clone().requires_grad_()
            c.grad = p.grad.detach() / divide_by
            copies.append(c)
        params = copies
    return float(torch_clip_grad_norm_(params, math.inf))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("setup")
    ap.add_argument("out")
    ap.add_argument("--clip", action="store_true")
    ap.add_argument("--clip-value", action="store_true")
    ap.add_argument("--nan-at", type=int, default=0)
    ap.add_argument("--attach", action="store_true")
    ap.add_argument("--bf16-loss", action="store_true", help="compute each micro-batch loss in bfloat16")
    ap.add_argument("--overflow-at", default="", help="steps (1,2,...) whose loss is 1e37 times larger: under "
                    "GradScaler their scaled gradients overflow and the step is skipped")
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()

    rank = 0
    if a.setup == "ddp":
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    torch.manual_seed(1234 + rank)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    torch.manual_seed(1234)
    for p in model.parameters():  # same initial weights on every rank
        torch.nn.init.normal_(p, std=0.3)
    torch.manual_seed(99 + rank)
    net = torch.nn.parallel.DistributedDataParallel(model) if a.setup == "ddp" else model

    if a.setup == "multi-opt":
        first, last = model[0], model[2]
        optimizers = [torch.optim.SGD([{"params": [first.weight], "lr": 0.05},
                                       {"params": [first.bias], "lr": 0.01}], momentum=0.9),
                      torch.optim.Adam(last.parameters(), lr=1e-3)]
    elif a.setup == "amp-fused":
        optimizers = [torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)]
    elif a.setup == "amp":
        optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3)]
    else:
        optimizers = [torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if a.setup.startswith("amp") else None
    overflow_at = {int(s) for s in a.overflow_at.split(",") if s}
    micro = 4 if a.setup == "accumulate" else 1
    params = list(model.parameters())
    probe = None
    if a.attach:
        import gradwatch

        probe = gradwatch.attach(net, optimizers if len(optimizers) > 1 else optimizers[0])

    norms, losses, skipped, clipped, opt_norms = [], [], [], [], []
    for step in range(1, a.steps + 1):
        step_loss = 0.0
        for _ in range(micro):
            x = torch.randn(8, 16)
            y = torch.randn(8, 4)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scaler is not None):
                out = net(x)
                loss = (F.mse_loss(out.bfloat16(), y.bfloat16()) if a.bf16_loss else F.mse_loss(out.float(), y)) / micro
            if step == a.nan_at:
                loss = loss * float("nan")  # a bad batch
            if step in overflow_at:
                loss = loss * 1e37  # finite, but not once scaled: fp16-style overflow
            step_loss += loss.item()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if a.setup == "amp":
            scaler.unscale_(optimizers[0])
        divide = scaler.get_scale() if a.setup == "amp-fused" else 1.0
        norms.append(reference_norm(params, divide))
        opt_norms.append([reference_norm([p for g in o.param_groups for p in g["params"]], divide) for o in optimizers])
        losses.append(step_loss)
        if a.clip:
            total = torch.nn.utils.clip_grad_norm_(params, max_norm=0.5)  # the script's own clipping
            clipped.append(bool(total + 1e-6 > 0.5))
        if a.clip_value:
            torch.nn.utils.clip_grad_value_(params, clip_value=0.01)
        scale = scaler.get_scale() if scaler is not None else None
        for opt in optimizers:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
            skipped.append(scale if scaler.get_scale() < scale else None)  # GradScaler halves the scale on a skip
        if probe is not None:
            probe.log(loss=step_loss)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    if probe is not None:
        probe.close()

    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"reference-{rank}.json").write_text(json.dumps(
        {"grad_norm": norms, "loss": losses, "skipped_scale": skipped, "clipped": clipped, "opt_norms": opt_norms}))
    if a.setup == "ddp":
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
