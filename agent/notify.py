"""Delivering alerts and actions: Alertmanager (API v2), a webhook, Grafana annotations, the log.

Each endpoint has its own delivery thread, so the ingest loop only appends to a bounded
queue and never waits on the network. A failed delivery is retried with exponential backoff
(0.5 s doubling to 30 s) for ``retry_seconds``; only then is it given up, counted and logged.
Alertmanager's API is state-based, so for it only the newest state of each alert is kept
(a resolve replaces the firing it follows); the webhook and Grafana get every change in order.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from gradwatch import __version__
from gradwatch.agent.actions import ActionNote
from gradwatch.agent.alerts import Alert
from gradwatch.agent.redact import redact, redact_url
from gradwatch.agent.settings import AgentConfig
from gradwatch.errors import require_grafana_client

log = logging.getLogger("gradwatch.agent")

MAX_PENDING = 10_000  # per endpoint: a dead endpoint cannot grow the agent's memory without bound
MAX_BATCH = 100
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
HTTP_TIMEOUT = 5.0
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "not ended"


@dataclass(frozen=True)
class Item:
    """One thing to deliver: an alert change, a periodic re-send of a firing alert, or an action."""

    kind: Literal["alert", "resend", "action"]
    payload: Alert | ActionNote

    @property
    def key(self) -> str:
        return self.payload.key if isinstance(self.payload, Alert) else self.payload.id


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- endpoints --------------------------------------------------------------------------------------
class Sink:
    name = "sink"
    kinds: frozenset[str] = frozenset({"alert"})
    coalesce = False  # keep only the newest item per key (state-based endpoints)

    def send(self, items: list[Item]) -> None:
        """Deliver or raise."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _HttpSink(Sink):
    """POSTs JSON with the standard library: two small posts do not justify an HTTP client in the
    environments gradwatch is installed into (some replace packages the training process uses)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.headers = {"Content-Type": "application/json", "User-Agent": f"gradwatch-agent/{__version__}"}

    def _post(self, url: str, body: Any) -> None:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(200).decode("utf-8", "replace")
            raise RuntimeError(f"HTTP {exc.code} from {redact_url(url)}: {detail}") from None


class AlertmanagerSink(_HttpSink):
    """POST /api/v2/alerts. A firing alert carries endsAt = now + ``hold``: if the agent goes away,
    Alertmanager resolves it by itself, as it does for Prometheus (which re-sends the same way)."""

    name = "alertmanager"
    kinds = frozenset({"alert", "resend"})
    coalesce = True

    def __init__(self, url: str, generator_url: str, hold: float, clock: Callable[[], float] = time.time) -> None:
        super().__init__(url.rstrip("/") + "/api/v2/alerts")
        self.generator_url = generator_url
        self.hold = hold
        self.clock = clock

    def body(self, items: list[Item]) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for item in items:
            alert = item.payload
            assert isinstance(alert, Alert)
            out.append({"labels": alert.labels, "annotations": alert.annotations,
                        "startsAt": rfc3339(alert.starts_at),
                        "endsAt": rfc3339(alert.ends_at if alert.ends_at is not None else now + self.hold),
                        "generatorURL": self.generator_url})
        return out

    def send(self, items: list[Item]) -> None:
        self._post(self.url, self.body(items))


class WebhookSink(_HttpSink):
    """A plain JSON webhook: Alertmanager's webhook payload (so existing receivers work), or a
    Slack-compatible message (Slack, Mattermost, Rocket.Chat, Discord's /slack endpoint)."""

    name = "webhook"

    def __init__(self, url: str, fmt: str, external_url: str) -> None:
        super().__init__(url)
        self.format = fmt
        self.external_url = external_url

    def body(self, items: list[Item]) -> dict[str, Any]:
        alerts = [i.payload for i in items if isinstance(i.payload, Alert)]
        return slack_message(alerts) if self.format == "slack" else alertmanager_webhook(alerts, self.external_url)

    def send(self, items: list[Item]) -> None:
        self._post(self.url, self.body(items))


def alertmanager_webhook(alerts: list[Alert], external_url: str) -> dict[str, Any]:
    common = dict(alerts[0].labels) if alerts else {}
    for alert in alerts[1:]:
        common = {k: v for k, v in common.items() if alert.labels.get(k) == v}
    runs = sorted({a.labels["run"] for a in alerts})
    return {
        "version": "4", "receiver": "gradwatch", "groupKey": "gradwatch:" + ",".join(runs), "truncatedAlerts": 0,
        "status": "firing" if any(a.firing for a in alerts) else "resolved",
        "groupLabels": {k: common[k] for k in ("alertname", "run") if k in common},
        "commonLabels": common, "commonAnnotations": {}, "externalURL": external_url,
        "alerts": [{"status": "firing" if a.firing else "resolved", "labels": a.labels, "annotations": a.annotations,
                    "startsAt": rfc3339(a.starts_at),
                    "endsAt": _ZERO_TIME if a.ends_at is None else rfc3339(a.ends_at),
                    "generatorURL": external_url, "fingerprint": a.key} for a in alerts],
    }


_SEVERITY_ICON = {"critical": ":red_circle:", "warning": ":large_orange_circle:", "info": ":large_blue_circle:"}


def _slack_links(annotations: dict[str, str]) -> str:
    links = [f"<{annotations[key]}|{title}>" for key, title in (("dashboard_url", "dashboard"),
                                                              ("runbook_url", "runbook")) if annotations.get(key)]
    return ("\n" + " · ".join(links)) if links else ""


def slack_message(alerts: list[Alert]) -> dict[str, Any]:
    lines = []
    for a in alerts:
        if a.firing:
            icon = _SEVERITY_ICON.get(a.labels.get("severity", ""), ":bell:")
            lines.append(f"{icon} *[FIRING] {a.name}* run `{a.labels['run']}` rank {a.labels['rank']} "
                         f"({a.labels.get('severity')})\n{a.annotations.get('summary', '')}\n"
                         f"_{a.annotations.get('hint', '')}_" + _slack_links(a.annotations))
        else:
            lines.append(f":white_check_mark: *[RESOLVED] {a.name}* run `{a.labels['run']}` rank {a.labels['rank']}")
    return {"text": "\n\n".join(lines), "username": "gradwatch"}


class GrafanaSink(Sink):
    """An annotation per action and per alert (tags: gradwatch, run:<run>, the alert or action name).
    An alert's annotation becomes a region when it resolves. Uses the grafana-client library."""

    name = "grafana"
    kinds = frozenset({"alert", "action"})

    def __init__(self, url: str, token: str | None) -> None:
        grafana_api: Any = require_grafana_client("Grafana annotations (grafana_url)")
        self.api = grafana_api.from_url(url, credential=token, timeout=HTTP_TIMEOUT)
        self.alert_annotations: dict[str, int] = {}  # firing alert key -> annotation id, to close the region

    def send(self, items: list[Item]) -> None:
        # one at a time, and each removed from ``items`` once posted, so a retry does not post it twice
        while items:
            self._post(items[0])
            items.pop(0)

    def _post(self, item: Item) -> None:
        annotations = self.api.annotations
        if isinstance(item.payload, ActionNote):
            a = item.payload
            rule = f", rule {a.rule}" if a.rule else ""
            annotations.add_annotation(
                time_from=int(a.t * 1000), tags=["gradwatch", "action", f"run:{a.run}", a.action],
                text=f"{a.action} ({a.reason}{rule}) at step {a.step}, rank {a.rank}: {a.detail}")
            return
        alert = item.payload
        assert isinstance(alert, Alert)
        tags = ["gradwatch", "alert", f"run:{alert.labels['run']}", alert.name, f"severity:{alert.labels['severity']}"]
        text = f"{alert.name}: {alert.annotations.get('summary', '')}"
        start = int(alert.starts_at * 1000)
        if alert.firing:
            result = annotations.add_annotation(time_from=start, tags=tags, text=text)
            if isinstance(result, dict) and "id" in result:
                self.alert_annotations[alert.key] = int(result["id"])
                if len(self.alert_annotations) > MAX_PENDING:
                    self.alert_annotations.pop(next(iter(self.alert_annotations)))
        elif alert.key in self.alert_annotations:
            # a PATCH replaces every field it carries (grafana-client sends them all): give them again
            annotations.partial_update_annotation(self.alert_annotations[alert.key], time_from=start,
                                                  time_to=int((alert.ends_at or time.time()) * 1000), tags=tags,
                                                  text=text)
            del self.alert_annotations[alert.key]


# -- one delivery thread per endpoint ---------------------------------------------------------------
@dataclass
class DeliveryStats:
    delivered: int = 0
    failed_attempts: int = 0
    expired: int = 0  # given up after retry_seconds
    dropped: int = 0  # queue full
    pending: int = 0


class DeliveryWorker:
    def __init__(self, sink: Sink, retry_seconds: float, *, max_pending: int = MAX_PENDING,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.retry_seconds = retry_seconds
        self.max_pending = max_pending
        self.monotonic = monotonic
        self.stats = DeliveryStats()
        self._pending: deque[tuple[Item, float]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"gradwatch-notify-{sink.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, items: Iterable[Item]) -> None:
        """Queue items; never blocks on the network."""
        now = self.monotonic()
        with self._cond:
            for item in items:
                if item.kind not in self.sink.kinds:
                    continue
                if self.sink.coalesce:  # the newest state of an alert replaces an older one not yet sent
                    for i, (queued, _) in enumerate(self._pending):
                        if queued.key == item.key:
                            del self._pending[i]
                            break
                if len(self._pending) >= self.max_pending:
                    self._pending.popleft()
                    self.stats.dropped += 1
                self._pending.append((item, now))
            self.stats.pending = len(self._pending)
            self._cond.notify()

    def stop(self, flush_seconds: float = 2.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=flush_seconds + HTTP_TIMEOUT)
        self.sink.close()

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                self._expire()
                while not self._pending and not self._stopping:
                    self._cond.wait()
                    self._expire()
                if not self._pending or (self._stopping and self._failing_since is not None):
                    return  # when stopping, what is left goes out only while the endpoint works
                batch = self._next_batch()
            sent = self._attempt(batch)
            with self._cond:
                # by identity: while we sent, a newer state of an alert may have replaced a queued one
                done = {id(item) for item in batch[:sent]}
                self._pending = deque(p for p in self._pending if id(p[0]) not in done)
                self.stats.pending = len(self._pending)
                if sent == len(batch):
                    backoff = 0.0
                    continue
                if self._stopping:
                    return
                backoff = min(BACKOFF_MAX, backoff * 2 if backoff else BACKOFF_FIRST)
                deadline = self.monotonic() + backoff
                while not self._stopping and (left := deadline - self.monotonic()) > 0:
                    self._cond.wait(left)  # new items do not cut the backoff short

    def _next_batch(self) -> list[Item]:
        """The oldest items, at most MAX_BATCH, up to a second change of one alert (it goes in the next one)."""
        batch, keys = [], set()
        for item, _ in itertools.islice(self._pending, MAX_BATCH):
            if item.key in keys:
                break
            keys.add(item.key)
            batch.append(item)
        return batch

    def _attempt(self, batch: list[Item]) -> int:
        """Send; return how many items at the head of the queue went out."""
        remaining = list(batch)
        try:
            self.sink.send(remaining)  # a sink that sends one by one removes what went out
        except Exception as exc:
            sent = len(batch) - len(remaining)
            self.stats.delivered += sent
            self.stats.failed_attempts += 1
            if self._failing_since is None:
                self._failing_since = self.monotonic()
                log.warning("cannot deliver to %s (%s); retrying with backoff for up to %.0f s", self.sink.name,
                            _safe(exc), self.retry_seconds)
            return sent
        self.stats.delivered += len(batch)
        if self._failing_since is not None:
            log.info("delivering to %s again after %.0f s", self.sink.name, self.monotonic() - self._failing_since)
            self._failing_since = None
        return len(batch)

    def _expire(self) -> None:
        limit = self.monotonic() - self.retry_seconds
        expired = 0
        while self._pending and self._pending[0][1] < limit:
            self._pending.popleft()
            expired += 1
        if expired:
            self.stats.expired += expired
            self.stats.pending = len(self._pending)
            log.error("gave up on %d notification(s) to %s after retrying for %.0f s", expired, self.sink.name,
                      self.retry_seconds)


def _safe(exc: BaseException) -> str:
    """An exception as one line, without anything that could hold a credential: headers are never in it, and the
    path, query and userinfo of every URL in it are cut (a webhook's secret is its path)."""
    return redact(f"{type(exc).__name__}: {str(exc)[:300]}")[:200]


# -- the front the daemon uses ----------------------------------------------------------------------
class Notifier:
    """Fans alert changes and actions out to the configured endpoints; logs them when asked to."""

    def __init__(self, sinks: list[Sink], *, retry_seconds: float, resend_seconds: float, console: bool,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.workers = [DeliveryWorker(sink, retry_seconds, monotonic=monotonic) for sink in sinks]
        self.resend_seconds = resend_seconds
        self.console = console
        self.monotonic = monotonic
        self._next_resend = monotonic() + resend_seconds

    @classmethod
    def from_config(cls, config: AgentConfig, agent_url: str) -> Notifier:
        sinks: list[Sink] = []
        if config.alertmanager_url is not None:
            sinks.append(AlertmanagerSink(str(config.alertmanager_url), agent_url + "/api/runs",
                                          hold=4 * config.alert_resend_seconds))
        if config.webhook_url is not None:
            sinks.append(WebhookSink(str(config.webhook_url), config.webhook_format, agent_url))
        if config.grafana_url is not None:
            token = config.grafana_token.get_secret_value() if config.grafana_token is not None else None
            sinks.append(GrafanaSink(str(config.grafana_url), token))
        return cls(sinks, retry_seconds=config.alert_retry_seconds, resend_seconds=config.alert_resend_seconds,
                   console=config.alert_console)

    def describe(self) -> str:
        names = [f"{w.sink.name} ({redact_url(w.sink.url)})" if isinstance(w.sink, _HttpSink) else w.sink.name
                 for w in self.workers] + (["log"] if self.console else [])
        return ", ".join(names) or "nowhere (no endpoint configured, alert_console off)"

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def alerts(self, changes: list[Alert], firing: list[Alert]) -> None:
        """Deliver alert changes; every ``resend_seconds`` also re-send the firing alerts (to Alertmanager)."""
        items = [Item("alert", a) for a in changes]
        if self.console:
            for a in changes:
                if a.firing:
                    log.warning("ALERT %s [%s] run %s rank %s: %s", a.name, a.labels["severity"], a.labels["run"],
                                a.labels["rank"], a.annotations.get("summary", ""))
                else:
                    log.info("resolved: %s run %s rank %s", a.name, a.labels["run"], a.labels["rank"])
        if self.monotonic() >= self._next_resend:
            self._next_resend = self.monotonic() + self.resend_seconds
            changed = {a.key for a in changes}
            items += [Item("resend", a) for a in firing if a.key not in changed]
        self._submit(items)

    def actions(self, notes: list[ActionNote]) -> None:
        self._submit([Item("action", n) for n in notes])

    def _submit(self, items: list[Item]) -> None:
        if items:
            for worker in self.workers:
                worker.submit(items)

    def stats(self) -> dict[str, DeliveryStats]:
        return {w.sink.name: w.stats for w in self.workers}
