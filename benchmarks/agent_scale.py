"""How many records a second one agent keeps up with, on one core (issue 16).

A generator pinned to one core writes valid step records (the probe's own encoder, a loss and a batch
size merged in, as a probe writes them) for ``--ranks`` ranks at ``--rate`` steps a second each; a real
``gradwatch agent`` pinned to another core ingests them. Sampled every ``--every`` seconds: the records the
agent ingested (its ``gradwatch_agent_records_ingested_total``), its ingest lag (how old the newest record
it ingested was, ``gradwatch_agent_ingest_lag_seconds``, and what it has still to read: bytes written minus
bytes read, from its checkpoint), the scrape (time and size of ``/metrics``), its RSS and CPU, and its
checkpoint (size, time to save). Then the writers stop and the agent's idle CPU is measured with every run
still exported. For scale, the raw parse rate of the same lines (``json.loads`` on one core) is measured in
the same run.

    python benchmarks/agent_scale.py                       # 5,000 ranks x 20 steps/s for 60 s
    python benchmarks/agent_scale.py --ranks 500 --seconds 30

Results: stdout (Markdown) and benchmarks/results/agent_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.records import RunMeta, StepRecord, encode, meta_to_json
from gradwatch.spool.writer import write_json_atomic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _line(step: int, t: float) -> bytes:
    return encode(StepRecord(step=step, t=t, grad_norm=1.2345678, lr=[0.001], dur=0.05, wait=0.002, seq=step,
                             values={"loss": 2.0 / (1 + step * 1e-3), "batch_size": 32}))


def raw_parse_rate(n: int = 200_000) -> float:
    """json.loads of the generator's lines, per second, on this core."""
    lines = [_line(i, 1.7e9 + i) for i in range(2000)] * (n // 2000)
    start = time.perf_counter()
    for line in lines:
        json.loads(line)
    return len(lines) / (time.perf_counter() - start)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _scrape(url: str) -> tuple[float, int, dict[str, float]]:
    start = time.perf_counter()
    with urllib.request.urlopen(url + "/metrics", timeout=120) as response:
        body = response.read()
    elapsed = time.perf_counter() - start
    agent = {}
    for raw in body.split(b"\n"):
        if raw.startswith(b"gradwatch_agent_") and b"{" not in raw:
            name, value = raw.decode().split(" ")[:2]
            agent[name] = float(value)
    return elapsed, len(body), agent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=5000)
    parser.add_argument("--ranks-per-run", type=int, default=1)
    parser.add_argument("--rate", type=float, default=20.0, help="steps per second of each rank")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples (each one scrapes)")
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--writer-core", type=int, default=0)
    parser.add_argument("--agent-core", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "agent_scale.json")
    args = parser.parse_args()

    os.sched_setaffinity(0, {args.writer_core})
    parse_rate = raw_parse_rate()
    home = Path(tempfile.mkdtemp(prefix="gradwatch-scale-"))
    layout = SpoolLayout(home)
    host, pid = socket.gethostname(), os.getpid()
    files: list[BinaryIO] = []
    for i in range(args.ranks):
        run, rank = f"run-{i // args.ranks_per_run:05d}", i % args.ranks_per_run
        run_dir = layout.run_dir(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(SpoolLayout.meta_file(run_dir, rank), meta_to_json(RunMeta(
            run=run, rank=rank, world_size=args.ranks_per_run, host=host, pid=pid, start_time=time.time(),
            run_uid="bench")))
        files.append(open(SpoolLayout.records_file(run_dir, rank), "ab"))  # noqa: SIM115 - closed below

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(home / "agent.log", "wb") as agent_log:
        agent = subprocess.Popen(["taskset", "-c", str(args.agent_core), sys.executable, "-m", "gradwatch", "agent",
                                  "--home", str(home), "--port", str(port), "--log-level", "warning"],
                                 stdout=subprocess.DEVNULL, stderr=agent_log)
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                break
        except OSError:
            time.sleep(0.1)

    samples: list[dict[str, Any]] = []
    interval = 1.0 / args.rate
    step, written, written_bytes = 0, 0, 0
    started = time.monotonic()
    next_tick, next_sample = started, started + args.every
    last_ingested, last_sample_t, last_cpu = 0.0, started, _cpu_seconds(agent.pid)
    behind_ticks = 0
    while time.monotonic() - started < args.seconds:
        step += 1
        now = time.time()
        line = _line(step, now)  # every rank's record of this step is the same line: encoded once
        for f in files:
            f.write(line)
        written_bytes += len(line) * len(files)
        for f in files:
            f.flush()
        written += len(files)
        next_tick += interval
        pause = next_tick - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            behind_ticks += 1
        if time.monotonic() >= next_sample:
            scrape_s, scrape_bytes, agent_metrics = _scrape(url)
            t = time.monotonic()
            cpu = _cpu_seconds(agent.pid)
            ingested = agent_metrics.get("gradwatch_agent_records_ingested_total", 0.0)
            samples.append({
                "t": round(t - started, 1), "written": written, "ingested": ingested,
                "ingest_rate": (ingested - last_ingested) / (t - last_sample_t),
                "backlog_records": written - ingested,
                "backlog_seconds": (written - ingested) / (len(files) * args.rate),
                "lag_seconds": agent_metrics.get("gradwatch_agent_ingest_lag_seconds"),
                "agent_cpu": (cpu - last_cpu) / (t - last_sample_t), "rss_mb": _rss_mb(agent.pid),
                "scrape_seconds": scrape_s, "scrape_mb": scrape_bytes / 1e6,
                "checkpoint_seconds": agent_metrics.get("gradwatch_agent_checkpoint_duration_seconds"),
                "checkpoint_mb": (agent_metrics.get("gradwatch_agent_checkpoint_bytes") or 0) / 1e6,
            })
            print(json.dumps(samples[-1]), flush=True)
            last_ingested, last_sample_t, last_cpu = ingested, t, cpu
            next_sample = t + args.every
            next_tick = max(next_tick, time.monotonic())
    for f in files:
        f.close()
    elapsed = time.monotonic() - started
    # what is left to read, then the idle agent
    drain_start = time.monotonic()
    while time.monotonic() - drain_start < 600:
        _, _, agent_metrics = _scrape(url)
        if agent_metrics.get("gradwatch_agent_records_ingested_total", 0) >= written:
            break
        time.sleep(1)
    drained_after = time.monotonic() - drain_start
    time.sleep(2)
    idle_cpu_start, idle_t = _cpu_seconds(agent.pid), time.monotonic()
    time.sleep(args.idle_seconds)
    idle_cpu = (_cpu_seconds(agent.pid) - idle_cpu_start) / (time.monotonic() - idle_t)
    final_scrape_s, final_scrape_bytes, _ = _scrape(url)
    rss = _rss_mb(agent.pid)
    agent.terminate()
    agent.wait(timeout=60)

    steady = samples[1:] or samples  # the first sample includes the agent's start
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) or "agent_scale.py",
        "ranks": args.ranks, "rate_per_rank": args.rate, "target_records_per_second": args.ranks * args.rate,
        "written_records_per_second": written / elapsed, "writer_fell_behind_ticks": behind_ticks,
        "raw_parse_per_second": parse_rate,
        "ingest_per_second_median": statistics.median(s["ingest_rate"] for s in steady) if steady else None,
        "max_backlog_seconds": max((s["backlog_seconds"] for s in steady), default=None),
        "max_lag_seconds": max((s["lag_seconds"] or 0 for s in steady), default=None),
        "agent_cpu_median": statistics.median(s["agent_cpu"] for s in steady) if steady else None,
        "max_rss_mb": max([s["rss_mb"] for s in samples] + [rss]),
        "scrape_seconds_max_under_load": max((s["scrape_seconds"] for s in steady), default=None),
        "scrape_seconds_idle": final_scrape_s, "scrape_mb": final_scrape_bytes / 1e6,
        "checkpoint_seconds_max": max((s["checkpoint_seconds"] or 0 for s in samples), default=None),
        "checkpoint_mb": max((s["checkpoint_mb"] for s in samples), default=None),
        "drained_after_seconds": drained_after, "idle_cpu": idle_cpu, "samples": samples,
    }
    if result["ingest_per_second_median"]:
        result["ingest_to_raw_parse"] = result["ingest_per_second_median"] / parse_rate
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print("| ranks x steps/s | written/s | ingested/s (median) | raw json.loads/s | ratio | max backlog | max lag | "
          "agent CPU | RSS | scrape (load / idle) | checkpoint | idle CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.ranks} x {args.rate:g} | {result['written_records_per_second']:,.0f} | "
          f"{result['ingest_per_second_median'] or 0:,.0f} | {parse_rate:,.0f} | {result.get('ingest_to_raw_parse', 0):.2f} | "
          f"{result['max_backlog_seconds'] or 0:.2f} s | {result['max_lag_seconds'] or 0:.2f} s | "
          f"{(result['agent_cpu_median'] or 0) * 100:.0f} % | {result['max_rss_mb']:.0f} MB | "
          f"{result['scrape_seconds_max_under_load'] or 0:.2f} / {final_scrape_s:.2f} s ({result['scrape_mb']:.1f} MB) | "
          f"{result['checkpoint_seconds_max'] or 0:.2f} s, {result['checkpoint_mb'] or 0:.1f} MB | "
          f"{idle_cpu * 100:.1f} % |")


if __name__ == "__main__":
    main()
