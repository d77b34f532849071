"""How long from a bad training step to the alert: at Alertmanager, at its webhook, at a direct webhook.

Real parts: Debian's prometheus-alertmanager (group_wait 1s), the agent as a subprocess, real torch
training (tests/support/rules_script.py) whose loss turns NaN at one step, a local webhook receiver.
Each repeat is a new run; the clock starts at the probe's own time stamp of the NaN step.

    python benchmarks/alert_latency.py [--repeats 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import SUPPORT, AgentProcess, AlertmanagerServer, WebhookReceiver, free_port

NAN_AT = 60


def nan_step_time(home: Path, run: str) -> float:
    for line in (home / "runs" / run / "rank-0.records.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "step" and record["step"] == NAN_AT:
            return float(record["t"])
    raise RuntimeError("NaN step not found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"alertmanager_api": [], "alertmanager_webhook": [], "direct_webhook": []}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        receiver = WebhookReceiver()
        am = AlertmanagerServer(Path(tmp) / "am", receiver.url)
        agent = AgentProcess(home, free_port(), "--alertmanager-url", am.url,
                             "--webhook-url", receiver.url + "/direct").start()
        try:
            for i in range(args.repeats):
                run = f"bench-{i}"
                env = {**os.environ, "GRADWATCH_HOME": str(home), "GRADWATCH_AUTOSTART": "0"}
                proc = subprocess.Popen([sys.executable, str(SUPPORT / "rules_script.py"), "--run-name", run,
                                         "--steps", "200", "--sleep", "0.02", "--nan-at", str(NAN_AT)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                seen_at_api = None
                deadline = time.monotonic() + 60
                while seen_at_api is None and time.monotonic() < deadline:
                    if any(a["labels"].get("run") == run for a in am.alerts()):
                        seen_at_api = time.time()
                    else:
                        time.sleep(0.02)
                proc.wait(timeout=120)
                while time.monotonic() < deadline and not all(
                        any(a["labels"].get("run") == run for r in receiver.received if r["path"] == path
                            for a in r["body"]["alerts"]) for path in ("/direct", "/alertmanager")):
                    time.sleep(0.05)
                t_bad = nan_step_time(home, run)

                def arrival(path: str, run: str = run) -> float:
                    return min(r["t"] for r in receiver.received if r["path"] == path
                               for a in r["body"]["alerts"] if a["labels"].get("run") == run)

                figures["alertmanager_api"].append((seen_at_api or float("nan")) - t_bad)
                figures["alertmanager_webhook"].append(arrival("/alertmanager") - t_bad)
                figures["direct_webhook"].append(arrival("/direct") - t_bad)
                print(f"run {i}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in figures.items()), flush=True)
        finally:
            agent.stop()
            am.stop()
            receiver.stop()
    print(f"\nNaN step -> alert, {args.repeats} runs (seconds):")
    for name, values in figures.items():
        print(f"  {name:22s} median {statistics.median(values):.2f}  max {max(values):.2f}")


if __name__ == "__main__":
    main()
