"""What importing the probe adds on top of torch: ``from gradwatch import attach`` in fresh processes.

    python benchmarks/import_time.py [--runs 15]

Each run is a new interpreter that imports torch, then times ``from gradwatch import attach``
(the attribute access loads the probe module). Target (issue 15): median <= 0.1 s. The rules'
pydantic models are built at ``attach()``, not at import (tests/probe/test_import_isolation.py).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

_CODE = """
import time
import torch
t0 = time.perf_counter()
from gradwatch import attach
attach
print(time.perf_counter() - t0)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    times = []
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, check=True, timeout=120)
        times.append(float(out.stdout.strip()))
        print(f"\r  run {i + 1}/{args.runs}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    times.sort()
    print(f"from gradwatch import attach, on top of torch: median {statistics.median(times) * 1000:.0f} ms, "
          f"min {times[0] * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms ({args.runs} fresh processes)")


if __name__ == "__main__":
    main()
