"""A plain training loop with no gradwatch in it, for ``gradwatch run`` tests.

    python zero_code_script.py OUT_DIR [--steps N] [--sleep S] [--catch] [--exit-code N] [--kill-self]

--catch: catch gradwatch.StopTraining the way a script that saves a checkpoint would.
--exit-code N: end with sys.exit(N) after training. --kill-self: end killed by SIGTERM.
"""

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

# asked before the import, as transformers and lightning do: the launcher must still see the import
assert importlib.util.find_spec("torch") is not None
import torch  # noqa: E402 - after find_spec on purpose (see above)

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--sleep", type=float, default=0.0)
ap.add_argument("--catch", action="store_true")
ap.add_argument("--exit-code", type=int, default=0)
ap.add_argument("--kill-self", action="store_true")
a = ap.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
step = 0


def train() -> None:
    global step
    for step in range(1, a.steps + 1):  # noqa: B007 - the global `step` is read after the loop and in finally
        x = torch.randn(16, 8)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(a.sleep)


try:
    if a.catch:
        import gradwatch

        try:
            train()
        except gradwatch.StopTraining as stop:
            torch.save(model.state_dict(), out / "checkpoint.pt")
            (out / "stopped.json").write_text(json.dumps({"step": step, "reason": str(stop)}))
    else:
        train()
finally:
    (out / "last_step").write_text(str(step))  # finally blocks run when StopTraining ends the script
if a.kill_self:
    os.kill(os.getpid(), signal.SIGTERM)
sys.exit(a.exit_code)
