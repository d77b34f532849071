"""Delivering alerts and annotations: payloads, retries with backoff, bounds, and secrets kept out of logs.

Webhooks are a real local HTTP server (tests/conftest.py WebhookReceiver). Grafana cannot run
here, so the annotation tests use a local HTTP stand-in of Grafana's annotations API
(POST /api/annotations, PATCH /api/annotations/<id>), driven by the real grafana-client library.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.actions import ActionNote
from gradwatch.agent.alerts import Alert
from gradwatch.agent.daemon import Agent
from gradwatch.agent.links import AlertLinks
from gradwatch.agent.notify import (
    AlertmanagerSink,
    DeliveryWorker,
    GrafanaSink,
    Item,
    Notifier,
    WebhookSink,
)
from gradwatch.agent.settings import AgentConfig, load_agent_config
from gradwatch.errors import ConfigError
from gradwatch.status import fetch_runs, print_runs
from tests.agent.helpers import SpoolBuilder
from tests.conftest import WebhookReceiver, free_port, http_json, reply_json, wait_until

TOKEN = "glsa_s3cr3t-token-never-in-logs"


def _alert(name: str = "GradwatchNonfiniteLoss", run: str = "r1", ends_at: float | None = None) -> Alert:
    return Alert({"alertname": name, "run": run, "rank": "0", "severity": "critical", "source": "agent"},
                 {"summary": f"Run {run}: loss is nan at step 7", "hint": "check the batch"}, starts_at=1000.0,
                 ends_at=ends_at)


def _worker(sink: Any, retry_seconds: float = 60.0, **kw: Any) -> Iterator[DeliveryWorker]:
    worker = DeliveryWorker(sink, retry_seconds, **kw)
    worker.start()
    yield worker
    worker.stop(flush_seconds=0.1)


# -- payloads ---------------------------------------------------------------------------------------
def test_webhook_gets_alertmanagers_webhook_payload_firing_then_resolved(webhook_receiver: WebhookReceiver) -> None:
    for worker in _worker(WebhookSink(webhook_receiver.url + "/hook", "alertmanager", "http://agent:9478")):
        worker.submit([Item("alert", _alert())])
        worker.submit([Item("alert", _alert(ends_at=1060.0))])
        wait_until(lambda: len(webhook_receiver.bodies()) == 2, what="two webhook posts")
    firing, resolved = webhook_receiver.bodies()
    assert firing["version"] == "4" and firing["status"] == "firing"
    assert firing["commonLabels"]["run"] == "r1" and firing["groupLabels"] == {"alertname": "GradwatchNonfiniteLoss",
                                                                               "run": "r1"}
    [alert] = firing["alerts"]
    assert alert["status"] == "firing" and alert["startsAt"] == "1970-01-01T00:16:40.000Z"
    assert alert["endsAt"] == "0001-01-01T00:00:00Z" and alert["annotations"]["summary"].startswith("Run r1")
    assert resolved["status"] == "resolved" and resolved["alerts"][0]["endsAt"] == "1970-01-01T00:17:40.000Z"


def test_slack_format_is_a_readable_message(webhook_receiver: WebhookReceiver) -> None:
    for worker in _worker(WebhookSink(webhook_receiver.url, "slack", "http://agent:9478")):
        worker.submit([Item("alert", _alert()), Item("alert", _alert("GradwatchLossSpike", "r2", ends_at=1.0))])
        wait_until(webhook_receiver.bodies, what="the slack post")
    [body] = webhook_receiver.bodies()
    assert set(body) == {"text", "username"}
    assert "*[FIRING] GradwatchNonfiniteLoss* run `r1` rank 0 (critical)" in body["text"]
    assert "Run r1: loss is nan at step 7" in body["text"] and "_check the batch_" in body["text"]
    assert "[RESOLVED] GradwatchLossSpike* run `r2`" in body["text"]


def test_slack_format_links_the_dashboard_and_the_runbook(webhook_receiver: WebhookReceiver) -> None:
    alert = _alert()
    alert.annotations.update(AlertLinks().annotations(alert.labels))
    for worker in _worker(WebhookSink(webhook_receiver.url, "slack", "http://agent:9478")):
        worker.submit([Item("alert", alert)])
        wait_until(webhook_receiver.bodies, what="the slack post")
    [body] = webhook_receiver.bodies()
    assert ("<http://127.0.0.1:3000/d/gradwatch-run?var-run=r1&var-rank=0|dashboard> · "
            "<https://github.com/gradwatch/gradwatch/blob/main/docs/alerts.md#gradwatchnonfiniteloss|runbook>"
            in body["text"])


def test_alert_links_come_from_the_settings_and_never_carry_credentials(tmp_path: Path) -> None:
    config = AgentConfig(home=tmp_path, grafana_url="https://admin:s3cret@grafana.internal:3443/g",
                         docs_url="https://wiki.example.com/gradwatch/")
    links = config.alert_links()
    assert links == AlertLinks("https://wiki.example.com/gradwatch", "https://grafana.internal:3443/g")
    assert "s3cret" not in links.dashboard_url({"run": "r 1/x"})
    assert links.dashboard_url({"run": "r 1/x", "rank": "3"}) == \
        "https://grafana.internal:3443/g/d/gradwatch-run?var-run=r+1%2Fx&var-rank=3"
    people = AgentConfig(home=tmp_path, grafana_url="http://grafana:3000", dashboard_url="https://grafana.example.com")
    assert people.alert_links().grafana_url == "https://grafana.example.com"
    assert AgentConfig(home=tmp_path).alert_links() == AlertLinks()  # the docker-compose Grafana, the project's docs


def test_alertmanager_payload_has_an_end_in_the_future_while_firing() -> None:
    sink = AlertmanagerSink("http://127.0.0.1:9093/", "http://agent/api/runs", hold=240, clock=lambda: 2000.0)
    assert sink.url == "http://127.0.0.1:9093/api/v2/alerts"
    [body] = sink.body([Item("alert", _alert())])
    assert body["labels"]["alertname"] == "GradwatchNonfiniteLoss" and body["generatorURL"] == "http://agent/api/runs"
    assert (body["startsAt"], body["endsAt"]) == ("1970-01-01T00:16:40.000Z", "1970-01-01T00:37:20.000Z")
    sink.close()


# -- retries and bounds -------------------------------------------------------------------------------
def test_failed_deliveries_are_retried_until_they_get_through_in_order(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.fail_next(3)  # 503, 503, 503, then 200
    for worker in _worker(WebhookSink(webhook_receiver.url, "alertmanager", "")):
        worker.submit([Item("alert", _alert(run="a"))])
        worker.submit([Item("alert", _alert(run="b"))])
        wait_until(lambda w=worker: w.stats.delivered == 2, timeout=20, what="delivery after three failures")
        assert worker.stats.failed_attempts == 3 and worker.stats.pending == 0
    runs = [a["labels"]["run"] for body in webhook_receiver.bodies() for a in body["alerts"]]
    assert runs == ["a", "b"]  # each once, in order


def test_a_dead_endpoint_is_retried_within_the_bound_then_given_up(caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"
    for worker in _worker(WebhookSink(dead, "alertmanager", ""), retry_seconds=1.5):
        worker.submit([Item("alert", _alert())])
        wait_until(lambda w=worker: w.stats.expired == 1, timeout=20, what="the delivery given up")
        assert worker.stats.failed_attempts >= 2 and worker.stats.delivered == 0 and worker.stats.pending == 0
    assert "cannot deliver to webhook" in caplog.text and "gave up on 1 notification(s) to webhook" in caplog.text


def test_submitting_never_waits_for_a_slow_endpoint(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.hold()  # requests hang until released (30 s at most)
    for worker in _worker(WebhookSink(webhook_receiver.url, "alertmanager", "")):
        worker.submit([Item("alert", _alert(run="first"))])
        wait_until(lambda: webhook_receiver.arrived == 1, what="first delivery in flight")
        for i in range(50):
            worker.submit([Item("alert", _alert(run=f"r{i}"))])
        # had a submit waited for the network, the held request would have completed by now
        assert webhook_receiver.received == [] and worker.stats.pending == 51
        webhook_receiver.release()
        wait_until(lambda w=worker: w.stats.delivered == 51, what="everything delivered once released")


def test_alertmanager_gets_only_the_newest_state_of_each_alert(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.hold()
    sink = AlertmanagerSink(webhook_receiver.url, "", hold=240)
    sink.url = webhook_receiver.url + "/api/v2/alerts"
    for worker in _worker(sink):
        worker.submit([Item("alert", _alert(run="in-flight"))])
        wait_until(lambda: webhook_receiver.arrived == 1, what="first delivery in flight")
        worker.submit([Item("alert", _alert(run="b"))])
        worker.submit([Item("resend", _alert(run="b"))])
        worker.submit([Item("alert", _alert(run="b", ends_at=1500.0))])  # resolved before it went out
        webhook_receiver.release()
        wait_until(lambda: len(webhook_receiver.bodies()) == 2, what="two posts")
    first, second = webhook_receiver.bodies()
    assert [a["labels"]["run"] for a in first] == ["in-flight"]
    assert [(a["labels"]["run"], a["endsAt"]) for a in second] == [("b", "1970-01-01T00:25:00.000Z")]


def test_the_queue_is_bounded_and_counts_what_it_drops(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.hold()
    for worker in _worker(WebhookSink(webhook_receiver.url, "alertmanager", ""), max_pending=3):
        for i in range(10):
            worker.submit([Item("alert", _alert(run=f"r{i}"))])
        assert worker.stats.pending == 3 and worker.stats.dropped == 7
        webhook_receiver.release()


def test_console_logs_firing_and_resolved(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gradwatch.agent")
    notifier = Notifier([], retry_seconds=10, resend_seconds=60, console=True)
    notifier.alerts([_alert(), _alert(ends_at=1001.0)], [])
    assert "ALERT GradwatchNonfiniteLoss [critical] run r1 rank 0: Run r1: loss is nan at step 7" in caplog.text
    assert "resolved: GradwatchNonfiniteLoss run r1 rank 0" in caplog.text


# -- Grafana annotations (local stand-in: no Grafana server can run here) --------------------------------
class GrafanaStandIn:
    """Grafana's annotations API as far as gradwatch uses it, checking the bearer token."""

    def __init__(self, token: str, fail: bool = False) -> None:
        self.annotations: dict[int, dict[str, Any]] = {}
        self.auth_headers: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict[str, Any]) -> None:
                reply_json(self, code, body)

            def _body(self) -> dict[str, Any]:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")

            def do_POST(self) -> None:
                body = self._body()
                stand_in.auth_headers.append(self.headers.get("Authorization", ""))
                if fail:
                    return self._reply(500, {"message": "internal error"})
                if self.headers.get("Authorization") != f"Bearer {token}":
                    return self._reply(401, {"message": "Unauthorized"})
                if self.path != "/api/annotations":
                    return self._reply(404, {"message": "not found"})
                new_id = len(stand_in.annotations) + 1
                stand_in.annotations[new_id] = body
                return self._reply(200, {"id": new_id, "message": "Annotation added"})

            def do_PATCH(self) -> None:
                body = self._body()
                ann_id = int(self.path.rsplit("/", 1)[1])
                if self.headers.get("Authorization") != f"Bearer {token}" or ann_id not in stand_in.annotations:
                    return self._reply(404, {"message": "not found"})
                # Grafana's PATCH semantics: a field is replaced when it is given (tags: even an empty list)
                existing = stand_in.annotations[ann_id]
                if body.get("text"):
                    existing["text"] = body["text"]
                if body.get("tags") is not None:
                    existing["tags"] = body["tags"]
                for key in ("time", "timeEnd"):
                    if body.get(key):
                        existing[key] = body[key]
                return self._reply(200, {"message": "Annotation patched"})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="test-grafana", daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def grafana() -> Iterator[GrafanaStandIn]:
    stand_in = GrafanaStandIn(TOKEN)
    yield stand_in
    stand_in.stop()


def test_actions_and_alerts_become_grafana_annotations(grafana: GrafanaStandIn) -> None:
    note = ActionNote(id="loss-spike@120", run="r1", rank=0, step=123, t=1000.5, action="reduce_lr", reason="spike",
                      rule="loss-spike", detail="lr 0.1 -> 0.05")
    for worker in _worker(GrafanaSink(grafana.url, TOKEN)):
        worker.submit([Item("action", note), Item("alert", _alert())])
        wait_until(lambda: len(grafana.annotations) == 2, what="two annotations")
        worker.submit([Item("alert", _alert(ends_at=1060.0))])
        wait_until(lambda: "timeEnd" in grafana.annotations[2] and grafana.annotations[2]["timeEnd"], what="region")
    action, alert = grafana.annotations[1], grafana.annotations[2]
    assert action["time"] == 1000500 and action["tags"] == ["gradwatch", "action", "run:r1", "reduce_lr"]
    assert action["text"] == "reduce_lr (spike, rule loss-spike) at step 123, rank 0: lr 0.1 -> 0.05"
    assert alert["tags"] == ["gradwatch", "alert", "run:r1", "GradwatchNonfiniteLoss", "severity:critical"]
    assert (alert["time"], alert["timeEnd"]) == (1000000, 1060000)
    assert set(grafana.auth_headers) == {f"Bearer {TOKEN}"}


def test_the_grafana_token_is_never_printed_or_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    failing = GrafanaStandIn(TOKEN, fail=True)
    try:
        config = load_agent_config(env={"GRADWATCH_GRAFANA_URL": failing.url, "GRADWATCH_GRAFANA_TOKEN": TOKEN})
        assert TOKEN not in repr(config) and TOKEN not in str(config) and TOKEN not in config.model_dump_json()
        notifier = Notifier.from_config(config, "http://agent")
        notifier.start()
        notifier.actions([ActionNote("x", "r1", 0, 1, 1.0, "stop", "nonfinite", None, "")])
        wait_until(lambda: notifier.stats()["grafana"].failed_attempts >= 1, what="a failed annotation")
        notifier.stop()
    finally:
        failing.stop()
    assert "cannot deliver to grafana" in caplog.text and TOKEN not in caplog.text
    with pytest.raises(ConfigError) as err:  # even a token of the wrong type is not echoed
        load_agent_config(env={}, cli={"grafana_token": 12345678})
    assert "12345678" not in str(err.value) and "grafana_token" in str(err.value)


# -- wired into the agent ---------------------------------------------------------------------------
def test_the_agent_sends_what_it_sees_to_every_endpoint(tmp_path: Path, grafana: GrafanaStandIn,
                                                        webhook_receiver: WebhookReceiver,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    spool = SpoolBuilder(home)
    import time as _time

    now = _time.time()
    spool.start("nan-run", t=now - 5)
    spool.steps("nan-run", 0, 1, 30, t0=now - 4, nan_every=25)  # a NaN loss at step 25
    spool.append("nan-run", 0, {"kind": "step", "step": 31, "t": now - 0.5, "grad_norm": float("nan"), "lr": [0.1],
                                "dur": 0.1, "skip": "nonfinite"})
    config = AgentConfig(home=home, port=0, webhook_url=webhook_receiver.url, webhook_format="slack",
                         grafana_url=grafana.url, grafana_token=TOKEN)  # type: ignore[arg-type]
    agent = Agent(config)
    agent.start()
    try:
        wait_until(webhook_receiver.bodies, what="the slack message")
        wait_until(lambda: len(grafana.annotations) >= 2, what="annotations for the skip and the alert")
        [run] = http_json(agent.url + "/api/runs")["runs"]
        [alert] = run["alerts"]
        assert (alert["alertname"], alert["severity"]) == ("GradwatchNonfiniteLoss", "critical")
        print_runs(*fetch_runs(url=agent.url))
        out = capsys.readouterr().out
        assert "1 alert(s) firing" in out and "GradwatchNonfiniteLoss: Run nan-run: loss is nan at step 25" in out
    finally:
        agent.stop()
    assert "GradwatchNonfiniteLoss* run `nan-run`" in webhook_receiver.bodies()[0]["text"]
    tags = sorted(tuple(a["tags"][:4]) for a in grafana.annotations.values())
    assert ("gradwatch", "action", "run:nan-run", "skip_step") in tags
    assert ("gradwatch", "alert", "run:nan-run", "GradwatchNonfiniteLoss") in tags


class _Recording(AlertmanagerSink):
    """Alertmanager's sink with the HTTP call replaced by a list (to watch the re-send timer only)."""

    def __init__(self) -> None:
        super().__init__("http://unused", "", hold=240)
        self.sent: list[Item] = []

    def send(self, items: list[Item]) -> None:
        self.sent += items


def test_firing_alerts_are_re_sent_to_alertmanager_on_a_timer_and_nowhere_else(
        webhook_receiver: WebhookReceiver) -> None:
    now = [0.0]
    am = _Recording()
    notifier = Notifier([am, WebhookSink(webhook_receiver.url, "alertmanager", "")], retry_seconds=60,
                        resend_seconds=60, console=False, monotonic=lambda: now[0])
    notifier.start()
    try:
        notifier.alerts([_alert()], [_alert()])  # fires: both endpoints get it
        wait_until(lambda: len(am.sent) == 1 and webhook_receiver.bodies(), what="the first delivery")
        now[0] = 30.0
        notifier.alerts([], [_alert()])  # nothing due
        now[0] = 61.0
        notifier.alerts([], [_alert()])  # due: re-sent to Alertmanager only
        wait_until(lambda: len(am.sent) == 2, what="the re-send")
        assert [i.kind for i in am.sent] == ["alert", "resend"] and len(webhook_receiver.bodies()) == 1
    finally:
        notifier.stop()
