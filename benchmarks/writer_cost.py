"""What the probe's writer thread spends, holding the GIL, to turn one step into a spool line: resolving the
captured numbers into a typed record (``to_record``) and encoding it (``encode``).

    python benchmarks/writer_cost.py            # 3 repeats of 3,000 records

The records are those of benchmarks/step_cost.py: an MLP 784-128-10 on the CPU (four gradients, whose
per-tensor norms the writer combines), one learning rate, and six scalars logged after the step (the loss as
a tensor, five Python numbers). This time is the writer's share of the training thread's tail: the
training thread waits for the GIL while the writer holds it (docs/benchmarks.md, issue 15).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from gradwatch.probes.captures import LogCapture, StepCapture, to_record
    from gradwatch.probes.gradnorm import NormOfNorms
    from gradwatch.spool.records import encode

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    loss = torch.nn.functional.cross_entropy(model(torch.randn(64, 784)), torch.randint(0, 10, (64,)))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    offset = time.time() - time.perf_counter()

    def capture(step: int) -> tuple[StepCapture, LogCapture]:
        norms = torch._foreach_norm(grads, 2.0)
        now = offset + time.perf_counter()
        return (StepCapture(step, now, 0.000512, 0.000101, NormOfNorms(norms), [0.01], None),
                LogCapture(step, now, {"loss": loss.detach().item(), "batch_size": 64, "accuracy": 0.5,
                                       "tokens": 1000.0, "lr_scale": 1.0, "aux": 0.1}))

    resolve_us, encode_us = [], []
    for _ in range(args.repeats):
        items = [capture(i) for i in range(args.records)]
        t0 = time.perf_counter()
        records = [to_record(step, logged) for step, logged in items]
        t1 = time.perf_counter()
        for record in records:
            encode(record)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        resolve_us.append((t1 - t0) / args.records * 1e6)
        encode_us.append((t2 - t1) / args.records * 1e6)
    r, e = statistics.median(resolve_us), statistics.median(encode_us)
    print(f"per step record (median of {args.repeats} x {args.records}): to_record {r:.1f} us, encode {e:.1f} us, "
          f"together {r + e:.1f} us")


if __name__ == "__main__":
    main()
