"""A word-level LSTM language model in the shape of PyTorch's official ``word_language_model`` example:
truncated BPTT over a batchified corpus, ``repackage_hidden``, ``clip_grad_norm_``, the parameters
updated by hand (``p.data.add_(p.grad, alpha=-lr)``, the example's default) or by AdamW, the LR
annealed by hand, and the whole model saved with ``torch.save(model, f)`` whenever validation improves.

    python rnn_lm.py OUT_DIR [--optimizer by-hand|adamw] [--attach] [--epochs 3]

Without ``--attach`` its only gradwatch line is ``gradwatch.log(val_loss=...)`` (run it under
``gradwatch run``, or plainly: then that line does nothing). It writes
``OUT_DIR/reference.json``: the clip result of each update (the norm before clipping), each layer's
gradient norm before clipping, the loss, and where the model was saved.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from lm_model import RNNModel  # in its own file, as the example's model.py: torch.save pickles a reference to it

import gradwatch  # the one line a script adds for its validation loss: a no-op when nothing watches it


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


def repackage_hidden(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


def get_batch(source, i, bptt=8):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def per_layer_norms(model):
    """Each layer's gradient norm before clipping (a layer: the module owning the parameters)."""
    squares = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            layer = name.rpartition(".")[0] or "(root)"
            squares[layer] = squares.get(layer, 0.0) + float(p.grad.double().square().sum())
    return {layer: math.sqrt(sq) for layer, sq in squares.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--optimizer", choices=["by-hand", "adamw"], default="by-hand")
    ap.add_argument("--attach", action="store_true")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save = out / "model.pt"

    torch.manual_seed(1111)
    ntokens = 50
    corpus = torch.randint(0, ntokens, (700,))
    train_data, val_data = batchify(corpus[:560], 10), batchify(corpus[560:], 5)
    model = RNNModel(ntokens)
    criterion = nn.NLLLoss()
    lr, clip = 5.0 if args.optimizer == "by-hand" else 0.01, 0.12  # some updates clipped, some not
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr) if args.optimizer == "adamw" else None
    probe = gradwatch.attach(model, optimizer) if args.attach else None

    norms, losses, layer_norms = [], [], []

    def evaluate(data_source):
        model.eval()
        total, hidden = 0.0, model.init_hidden(5)
        with torch.no_grad():
            for i in range(0, data_source.size(0) - 1, 8):
                data, targets = get_batch(data_source, i)
                output, hidden = model(data, hidden)
                hidden = repackage_hidden(hidden)
                total += len(data) * criterion(output, targets).item()
        return total / (len(data_source) - 1)

    best_val_loss = None
    for _epoch in range(args.epochs):
        model.train()
        hidden = model.init_hidden(10)
        for i in range(0, train_data.size(0) - 1, 8):
            data, targets = get_batch(train_data, i)
            model.zero_grad()
            hidden = repackage_hidden(hidden)
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            layer_norms.append(per_layer_norms(model))
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            if optimizer is None:
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-lr)
            else:
                optimizer.step()
            losses.append(loss.item())
            if probe is not None:
                probe.log(loss=loss)
        val_loss = evaluate(val_data)
        gradwatch.log(val_loss=val_loss)
        if not best_val_loss or val_loss < best_val_loss:
            with open(save, "wb") as f:
                torch.save(model, f)
            best_val_loss = val_loss
        elif optimizer is None:
            lr /= 4.0
    with open(save, "rb") as f:  # the example reloads the best model for the test set
        model = torch.load(f, weights_only=False)
    test_loss = evaluate(val_data)
    if probe is not None:
        probe.close()
    (out / "reference.json").write_text(json.dumps(
        {"grad_norm": norms, "loss": losses, "layer_grad_norms": layer_norms, "saved": str(save), "test_loss": test_loss,
         "test_ppl": math.exp(test_loss)}))


if __name__ == "__main__":
    main()
