"""Errors that are the user's to fix: the CLI prints their message as one line, no traceback."""

from __future__ import annotations

from typing import Any


class GradwatchError(Exception):
    """Base of errors with a message that says what is wrong and how to fix it."""


class ConfigError(GradwatchError):
    """A configuration value is invalid; the message names the field, the value and its source."""


class StopTraining(SystemExit):  # named for what it asks, like StopIteration
    """Raised from ``optimizer.step()`` when a rule stops the run and the probe was attached with
    ``on_stop="raise"`` (the zero-code launcher's default). Catch it to save a checkpoint.

    A SystemExit with exit code 0: left uncaught, it ends the script cleanly (``finally`` blocks and
    atexit handlers run, no traceback), and a broad ``except Exception`` in the script does not
    swallow it. Every rank raises it after the same step, so DDP processes leave together."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 0  # stopping early is a successful end of training, not a failure


class MissingExtraError(ConfigError):
    """A feature needs a package of an optional extra that is not installed."""


def require_grafana_client(feature: str) -> type[Any]:
    """``grafana_client.GrafanaApi``, or MissingExtraError saying how to install it. The Grafana client is an
    extra (``gradwatch[grafana]``): its HTTP stack must not be forced into every training environment."""
    try:
        from grafana_client.api import GrafanaApi
    except ImportError:
        raise MissingExtraError(f"{feature} needs the grafana-client package: pip install 'gradwatch[grafana]'") \
            from None
    return GrafanaApi
