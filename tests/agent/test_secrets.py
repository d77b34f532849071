"""Secrets never printed: webhook paths, basic-auth URLs and the Grafana token stay out of logs, error
messages and `ps`; each can come from a file (as Prometheus and Alertmanager take them)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.agent.notify import DeliveryWorker, Item, Notifier, WebhookSink
from gradwatch.agent.redact import redact, redact_url
from gradwatch.agent.settings import load_agent_config
from gradwatch.errors import ConfigError
from tests.agent.test_notify import _alert
from tests.conftest import WebhookReceiver, wait_until

SECRET = "XyZsEcReT0000"


@pytest.mark.parametrize(("url", "shown"), [
    (f"https://hooks.slack.com/services/T0000/B0000/{SECRET}", "https://hooks.slack.com/…"),
    (f"http://admin:{SECRET}@127.0.0.1:9093", "http://127.0.0.1:9093"),
    (f"http://127.0.0.1:9093/?token={SECRET}", "http://127.0.0.1:9093/…"),
    ("http://127.0.0.1:9093", "http://127.0.0.1:9093"),
    ("http://127.0.0.1:9093/", "http://127.0.0.1:9093/"),
])
def test_a_url_is_shown_as_scheme_host_and_port(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert SECRET not in redact(f"HTTP 500 from {url}: oops")


def test_a_failed_webhook_delivery_logs_no_secret(webhook_receiver: WebhookReceiver,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    webhook_receiver.fail_next(2)
    url = f"{webhook_receiver.url}/services/T0000/B0000/{SECRET}"
    worker = DeliveryWorker(WebhookSink(url, "slack", ""), 60.0)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        worker.start()
        worker.submit([Item("alert", _alert())])
        wait_until(lambda: worker.stats.delivered == 1, timeout=20, what="delivery after two failures")
        worker.stop(flush_seconds=0.1)
    assert "cannot deliver to webhook (RuntimeError: HTTP 503 from http://127.0.0.1:" in caplog.text
    assert SECRET not in caplog.text and "/services" not in caplog.text
    notifier = Notifier([WebhookSink(url, "slack", "")], retry_seconds=1, resend_seconds=1, console=False)
    assert notifier.describe() == f"webhook ({redact_url(url)})" and SECRET not in notifier.describe()


def test_secrets_can_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text(f"https://hooks.slack.com/services/T0/B0/{SECRET}\n")
    (tmp_path / "am").write_text(f"http://gradwatch:{SECRET}@127.0.0.1:9093\n")
    (tmp_path / "token").write_text(f"glsa_{SECRET}\n")
    config = load_agent_config(env={"GRADWATCH_WEBHOOK_URL_FILE": str(tmp_path / "hook"),
                                    "GRADWATCH_GRAFANA_TOKEN_FILE": str(tmp_path / "token")},
                               cli={"alertmanager_url_file": tmp_path / "am"})
    assert str(config.webhook_url).endswith(SECRET) and config.alertmanager_url is not None
    assert config.alertmanager_url.password == SECRET
    assert config.grafana_token is not None and config.grafana_token.get_secret_value() == f"glsa_{SECRET}"
    assert SECRET not in repr(config.grafana_token)


def test_a_secret_given_twice_or_unreadable_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text("https://example.com/hook\n")
    with pytest.raises(ConfigError, match="webhook_url is given twice: environment variable GRADWATCH_WEBHOOK_URL"):
        load_agent_config(env={"GRADWATCH_WEBHOOK_URL": "https://example.com/x"},
                          cli={"webhook_url_file": tmp_path / "hook"})
    with pytest.raises(ConfigError, match=r"cannot read webhook_url_file .*missing \(option --webhook-url-file\)"):
        load_agent_config(env={}, cli={"webhook_url_file": tmp_path / "missing"})


def test_a_bad_url_setting_is_reported_without_its_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent_config(env={"GRADWATCH_WEBHOOK_URL": f"hooks.slack.com/services/{SECRET}"})
    assert "webhook_url" in str(caught.value) and SECRET not in str(caught.value)


def test_a_url_on_the_command_line_gets_a_warning_to_move_it(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gradwatch", "agent", "--home", str(tmp_path / "home"), "--port", "0",
                           "--webhook-url", f"https://hooks.slack.com/services/T0/B0/{SECRET}",
                           "--exit-when-idle", "0.5"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "--webhook-url is visible to every user of this machine (ps)" in done.stderr
    assert SECRET not in done.stderr and "webhook (https://hooks.slack.com/…)" in done.stderr
