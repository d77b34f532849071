"""``gradwatch agent`` with NVML faked (tests/support/fake_nvml.py), for machines without a GPU.

Two fake GPUs; GPU i runs the live training processes of this spool whose local rank is i
(their pids come from the runs' metadata, as NVML would list them). Used where a test needs
the GPU series (the dashboards' panel queries); the collector's own logic is unit-tested.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.fake_nvml import FakeGpu, FakeNvml


class SpoolGpu(FakeGpu):
    @property
    def pids(self) -> list[int]:  # type: ignore[override]
        home = Path(HOME)
        pids = []
        for meta in home.glob("runs/*/rank-*.meta.json"):
            try:
                body = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if body.get("local_rank", body.get("rank")) == self.index:
                pids.append(body["pid"])
        return pids

    @pids.setter
    def pids(self, value: list[int]) -> None:
        pass


HOME = os.environ.get("GRADWATCH_HOME", "")


def main() -> None:
    global HOME  # noqa: PLW0603 - one per process: torch's hooks and functions are process-wide
    if "--home" in sys.argv:
        HOME = sys.argv[sys.argv.index("--home") + 1]
    gpus = []
    for index in range(2):
        gpu = SpoolGpu(uuid=f"GPU-fake-{index}", utilization=80 + index)
        gpu.index = index  # type: ignore[attr-defined]
        gpus.append(gpu)
    sys.modules["pynvml"] = FakeNvml(gpus)  # type: ignore[assignment]
    from gradwatch.cli import main as cli_main

    cli_main(["agent", *sys.argv[1:]])


if __name__ == "__main__":
    main()
