"""A small Transformers Trainer run with gradwatch's callback: a tiny randomly initialised GPT-2 on
random tokens (nothing downloaded). Writes the Trainer's own log history for comparison.

    python hf_script.py OUT_DIR [--steps N] [--accumulate K] [--rules FILE] [--sleep S] [--eval-every N]
                            [--save-every N] [--resume]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from gradwatch.probes.hf_trainer import GradwatchCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Slow(TrainerCallback):
    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.sleep)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--rules")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--run", default="hf")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate on held-out tokens every N steps")
    ap.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps")
    ap.add_argument("--resume", action="store_true", help="train(resume_from_checkpoint=True): the newest checkpoint")
    ap.add_argument("--restore-callbacks", action="store_true", help="restore_callback_states_from_checkpoint=True")
    a = ap.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(
        output_dir=str(Path(a.out) / "trainer"), max_steps=a.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=a.accumulate, learning_rate=5e-3, warmup_steps=5, logging_steps=1,
        max_grad_norm=a.max_grad_norm, report_to="none",
        **({"save_strategy": "steps", "save_steps": a.save_every} if a.save_every else {"save_strategy": "no"}),
        disable_tqdm=True, use_cpu=True, seed=0,
        dataloader_num_workers=0, restore_callback_states_from_checkpoint=a.restore_callbacks,
        **({"eval_strategy": "steps", "eval_steps": a.eval_every, "per_device_eval_batch_size": 16}
           if a.eval_every else {}),
    )
    callback = GradwatchCallback(run=a.run, rules=a.rules, layer_stats_every=10)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(2048), callbacks=[callback, Slow(a.sleep)],
                      eval_dataset=RandomTokens(64) if a.eval_every else None)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GradwatchCallback))  # restored
    (Path(a.out) / "result.json").write_text(json.dumps({
        "log_history": trainer.state.log_history, "global_step": trainer.state.global_step,
        "max_grad_norm": trainer.args.max_grad_norm, "stop_reason": callback.probe.stop_reason,
        "base_lrs": trainer.lr_scheduler.base_lrs, "run": callback.probe.run,
    }))


if __name__ == "__main__":
    main()
