"""Fixtures shared by every test: an isolated spool, free ports, real servers, hygiene checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own GRADWATCH_HOME, and probes never spawn a daemon unless a test asks."""
    home = tmp_path / "gradwatch-home"
    monkeypatch.setenv("GRADWATCH_HOME", str(home))
    monkeypatch.setenv("GRADWATCH_AUTOSTART", "0")
    for var in ("GRADWATCH_RUN", "GRADWATCH_RUN_ID", "GRADWATCH_PORT", "GRADWATCH_CONFIG", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """A test must stop every gradwatch thread it started (probe writers, agent loops)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [t.name for t in threading.enumerate()
                  if t.ident not in before and t.is_alive() and t.name.startswith("gradwatch")]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {leaked}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # the server may not be up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what or predicate}: last={last!r}")


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def http_json(url: str) -> Any:
    return json.loads(http_get(url))


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse exposition text with prometheus_client's own parser into {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# -- real processes -------------------------------------------------------------------------------
class AgentProcess:
    """``gradwatch agent`` as a real subprocess on a free port."""

    def __init__(self, home: Path, port: int, *extra: str) -> None:
        self.home, self.port, self.extra = home, port, extra
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home.parent / f"agent-{port}.log"

    def start(self) -> AgentProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gradwatch", "agent", "--home", str(self.home), "--port", str(self.port),
                 "--log-level", "debug", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_until(lambda: http_json(self.url + "/healthz")["ok"], timeout=30, what=f"agent on {self.url}")
        return self

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return parse_metrics(http_get(self.url + "/metrics").decode())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def agent_process(isolated_home: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(*extra: str, port: int | None = None) -> AgentProcess:
        agent = AgentProcess(isolated_home, port or free_port(), *extra).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop(signal.SIGKILL)


def run_training(home: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True,
                 timeout: float = 300) -> subprocess.Popen[bytes]:
    """Start tests/support/train_script.py (a real torch training loop with a probe) as a subprocess."""
    full_env = {**os.environ, "GRADWATCH_HOME": str(home), **(env or {})}
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "train_script.py"), *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{out.decode()}\n{err.decode()}"
    return proc


# -- a real Prometheus ----------------------------------------------------------------------------
PROMETHEUS = shutil.which("prometheus")


class PrometheusServer:
    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: gradwatch\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS or "prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_until(lambda: http_get(self.url + "/-/ready"), timeout=60, what="prometheus ready")

    def query(self, promql: str) -> list[dict[str, Any]]:
        from urllib.parse import urlencode

        body = http_json(f"{self.url}/api/v1/query?{urlencode({'query': promql})}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], PrometheusServer]]:
    if PROMETHEUS is None:
        pytest.fail("the Debian package 'prometheus' is not installed; scripts/test.sh installs it")
    servers: list[PrometheusServer] = []

    def start(targets: list[str]) -> PrometheusServer:
        workdir = tmp_path / f"prometheus-{len(servers)}"
        workdir.mkdir()
        server = PrometheusServer(workdir, targets)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
