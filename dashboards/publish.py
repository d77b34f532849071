"""``gradwatch dashboards export`` and ``push``: the packaged dashboards to files or to a Grafana."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradwatch.dashboards import load_all
from gradwatch.errors import ConfigError, GradwatchError, require_grafana_client

FOLDER_UID = "gradwatch"
_VOLATILE = ("id", "version")  # set by Grafana on every save; not part of what we ship


class PushError(GradwatchError):
    pass


@dataclass(frozen=True)
class PushResult:
    name: str
    uid: str
    outcome: str  # created | updated | unchanged
    url: str


def export(directory: Path) -> list[Path]:
    """Write every dashboard as ``<dir>/gradwatch-<name>.json`` (for Grafana's file provisioning)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in load_all().items():
        path = directory / f"gradwatch-{name}.json"
        path.write_text(json.dumps(model, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def push(url: str, token: str | None, folder: str = "gradwatch",
         progress: Callable[[PushResult], None] = lambda r: None) -> list[PushResult]:
    """Create or update every dashboard in ``folder``; a dashboard already identical is left alone."""
    try:
        grafana_api: Any = require_grafana_client("gradwatch dashboards push")
    except ConfigError as exc:
        raise PushError(str(exc)) from None
    from grafana_client.client import GrafanaClientError, GrafanaException

    api = grafana_api.from_url(url, credential=token)
    results = []
    try:
        folder_uid = _ensure_folder(api, folder)
        for name, model in load_all().items():
            outcome = _push_one(api, model, folder_uid)
            link = url.rstrip("/") + f"/d/{model['uid']}"
            results.append(result := PushResult(name, model["uid"], outcome, link))
            progress(result)
    except GrafanaClientError as exc:
        hint = " (check --token: a service-account token with the Editor role)" if exc.status_code in (401, 403) else ""
        raise PushError(f"Grafana at {url} refused the request: {exc.status_code} {exc.message}{hint}") from None
    except GrafanaException as exc:
        raise PushError(f"Grafana at {url} answered with an error: {exc}") from None
    except OSError as exc:
        raise PushError(f"cannot reach Grafana at {url}: {exc}") from None
    except Exception as exc:  # the HTTP client's connection errors (niquests, requests) are not OSErrors
        if type(exc).__module__.startswith(("niquests", "requests", "urllib3")):
            raise PushError(f"cannot reach Grafana at {url}: {exc}") from None
        raise
    return results


def _ensure_folder(api: Any, title: str) -> str:
    from grafana_client.client import GrafanaClientError

    try:
        return api.folder.get_folder(FOLDER_UID)["uid"]
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
    return api.folder.create_folder(title, uid=FOLDER_UID)["uid"]


def _push_one(api: Any, model: dict[str, Any], folder_uid: str) -> str:
    from grafana_client.client import GrafanaClientError

    try:
        current = api.dashboard.get_dashboard(model["uid"])
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        current = None
    if current is not None and _same(current.get("dashboard", {}), model) \
            and current.get("meta", {}).get("folderUid") == folder_uid:
        return "unchanged"
    api.dashboard.update_dashboard({"dashboard": {**model, "id": None}, "folderUid": folder_uid, "overwrite": True,
                                    "message": "gradwatch dashboards push"})
    return "created" if current is None else "updated"


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in _VOLATILE}
    return strip(a) == strip(b)
