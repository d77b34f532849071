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
    for var in ("GRADWATCH_RUN", "GRADWATCH_RUN_ID", "GRADWATCH_PORT", "GRADWATCH_CONFIG", "RANK", "WORLD_SIZE",
                "GRADWATCH_ALERTMANAGER_URL", "GRADWATCH_WEBHOOK_URL", "GRADWATCH_GRAFANA_URL",
                "GRADWATCH_GRAFANA_TOKEN"):
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


def reply_json(handler: Any, code: int, body: Any) -> None:
    """Answer a BaseHTTPRequestHandler request with a JSON body (for the local HTTP stand-ins)."""
    data = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


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

    def __init__(self, home: Path, port: int, *extra: str, fake_gpus: bool = False) -> None:
        self.home, self.port, self.extra = home, port, extra
        # fake_gpus: NVML faked with two GPUs (tests/support/agent_with_fake_gpus.py); no GPU on CI machines
        self.command = [sys.executable, str(SUPPORT / "agent_with_fake_gpus.py")] if fake_gpus \
            else [sys.executable, "-m", "gradwatch", "agent"]
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home.parent / f"agent-{port}.log"

    def start(self) -> AgentProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "--home", str(self.home), "--port", str(self.port),
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

    def start(*extra: str, port: int | None = None, fake_gpus: bool = False) -> AgentProcess:
        agent = AgentProcess(isolated_home, port or free_port(), *extra, fake_gpus=fake_gpus).start()
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


class _ServerProcess:
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _servers(tmp_path: Path, kind: str, make: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Start servers of one kind on demand, each in its own work directory; stop them all afterwards."""
    servers: list[_ServerProcess] = []

    def start(*args: Any, **options: Any) -> Any:
        server = make(tmp_path / f"{kind}-{len(servers)}", *args, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class PrometheusServer(_ServerProcess):
    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path] | None = None,
                 alertmanagers: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        text = ("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                "scrape_configs:\n  - job_name: gradwatch\n    static_configs:\n"
                f"      - targets: {json.dumps(targets)}\n")
        if rule_files:
            text += f"rule_files: {json.dumps([str(f) for f in rule_files])}\n"
        if alertmanagers:
            text += f"alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: {json.dumps(alertmanagers)}\n"
        config.write_text(text)
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


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    if PROMETHEUS is None:
        pytest.fail("the Debian package 'prometheus' is not installed; scripts/test.sh installs it")
    yield from _servers(tmp_path, "prometheus", PrometheusServer)


# -- a real Alertmanager and a webhook receiver -------------------------------------------------------
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


class WebhookReceiver:
    """A local HTTP endpoint that records every JSON POST with the time it arrived.

    ``fail_next(n)`` answers the next n requests with 503; ``hold()`` keeps requests waiting
    until ``release()`` (to show a slow endpoint does not block the sender's caller)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[dict[str, Any]] = []  # {"t", "path", "headers", "body"}
        self.arrived = 0  # requests that reached the handler (also those held or failed)
        self._failures = 0
        self._open = threading.Event()
        self._open.set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with receiver.lock:
                    receiver.arrived += 1
                receiver._open.wait(30)
                with receiver.lock:
                    failing = receiver._failures > 0
                    receiver._failures -= failing
                    if not failing:
                        receiver.received.append({"t": time.time(), "path": self.path, "method": self.command,
                                                  "headers": dict(self.headers),
                                                  "body": json.loads(raw) if raw else None})
                self.send_response(503 if failing else 200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            do_POST = do_PUT = do_PATCH = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="test-webhook", daemon=True)
        self._thread.start()

    def fail_next(self, n: int) -> None:
        with self.lock:
            self._failures = n

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def bodies(self) -> list[Any]:
        with self.lock:
            return [r["body"] for r in self.received]

    def alerts(self) -> list[tuple[float, dict[str, Any]]]:
        """Every alert of every Alertmanager-webhook payload received: (arrival time, alert)."""
        with self.lock:
            return [(r["t"], a) for r in self.received if isinstance(r["body"], dict)
                    for a in r["body"].get("alerts", [])]

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


class AlertmanagerServer(_ServerProcess):
    """Debian's prometheus-alertmanager on a loopback port, routing everything to ``webhook_url`` at once."""

    def __init__(self, workdir: Path, webhook_url: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "alertmanager.yml"
        config.write_text(
            "route:\n  receiver: hook\n  group_by: [alertname, run]\n"
            "  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n"
            "receivers:\n  - name: hook\n    webhook_configs:\n"
            f"      - url: {webhook_url}/alertmanager\n        send_resolved: true\n"
        )
        self.log = workdir / "alertmanager.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [ALERTMANAGER or "prometheus-alertmanager", f"--config.file={config}",
                 f"--storage.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--cluster.listen-address=", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_until(lambda: http_get(self.url + "/-/ready"), timeout=60, what="alertmanager ready")

    def alerts(self) -> list[dict[str, Any]]:
        return list(http_json(self.url + "/api/v2/alerts"))


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Callable[..., AlertmanagerServer]]:
    if ALERTMANAGER is None:
        pytest.fail("the Debian package 'prometheus-alertmanager' is not installed; scripts/test.sh installs it")
    yield from _servers(tmp_path, "alertmanager", AlertmanagerServer)
