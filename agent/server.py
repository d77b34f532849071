"""HTTP endpoints of the agent: /metrics (Prometheus), /healthz, /api/runs (JSON)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from gradwatch.errors import GradwatchError

StartResponse = Callable[..., Any]
#: Prometheus' text format. Served whatever the scraper prefers (Prometheus asks for OpenMetrics first and
#: takes this too), uncompressed: the agent is scraped over loopback or its node's network.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


def build_app(
    metrics: Callable[[], bytes], runs: Callable[[], list[dict[str, Any]]], health: Callable[[], dict[str, Any]]
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def json_response(start_response: StartResponse, status: str, body: Any) -> list[bytes]:
        data = json.dumps(body, indent=1, default=str).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body = metrics()
            start_response("200 OK", [("Content-Type", METRICS_CONTENT_TYPE), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/api/runs":
            return json_response(start_response, "200 OK", {"runs": runs()})
        if path == "/healthz":
            report = health()
            return json_response(start_response, "200 OK" if report["ok"] else "503 Service Unavailable", report)
        if path == "/":
            body = b"gradwatch agent\n\n/metrics   Prometheus metrics\n/api/runs  runs as JSON\n/healthz   health\n"
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        return json_response(start_response, "404 Not Found", {"error": f"no such endpoint {path}"})

    return app


class HttpServer:
    def __init__(self, host: str, port: int, app: Callable[..., Iterable[bytes]]) -> None:
        try:
            self._server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            raise GradwatchError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another agent running "
                f"(`gradwatch status`)? Choose another port with --port or GRADWATCH_PORT"
            ) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="gradwatch-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
