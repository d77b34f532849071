"""Hugging Face Transformers' Trainer with gradwatch's callback (one line: ``callbacks=[GradwatchCallback()]``).

    python examples/hf_trainer.py
    gradwatch run -- python examples/hf_trainer.py      # same, plus --run/--rules from the CLI

A tiny randomly initialised GPT-2 on random tokens, so nothing is downloaded. The recorded gradient
norm is the Trainer's own clip_grad_norm_ result (before clipping); stop, LR and clipping actions go
through TrainerControl and the Trainer's arguments.
"""

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradwatch.probes.hf_trainer import GradwatchCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 4096, length: int = 32, vocab: int = 128) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
args = parser.parse_args()

model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2))
training_args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="hf-example-"), max_steps=args.steps,
                                  per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=10,
                                  logging_steps=25, report_to="none", save_strategy="no", disable_tqdm=True)
Trainer(model=model, args=training_args, train_dataset=RandomTokens(), callbacks=[GradwatchCallback()]).train()
