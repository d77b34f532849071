"""``gradwatch dashboards export`` and ``push``. No Grafana server can run on these machines:
push is tested with the real grafana-client against a local stand-in of the parts of Grafana's
HTTP API it uses (folders, dashboards by uid, save with overwrite), which checks the token and
keeps what was saved, as Grafana does (adding id and version)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gradwatch.cli import main as cli_main
from gradwatch.dashboards import NAMES, load
from gradwatch.dashboards.publish import PushError, push
from tests.conftest import reply_json

TOKEN = "glsa_test_token"


class GrafanaDashboardsStandIn:
    def __init__(self) -> None:
        self.folders: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.saves = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: Any) -> None:
                reply_json(self, code, body)

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                    return True
                self._reply(401, {"message": "invalid API key"})
                return False

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                if self.path.startswith("/api/folders/"):
                    folder = stand_in.folders.get(self.path.rsplit("/", 1)[1])
                    return self._reply(200, folder) if folder else self._reply(404, {"message": "folder not found"})
                if self.path.startswith("/api/dashboards/uid/"):
                    saved = stand_in.dashboards.get(self.path.rsplit("/", 1)[1])
                    return self._reply(200, saved) if saved else self._reply(404, {"message": "Dashboard not found"})
                return self._reply(404, {"message": "not found"})

            def do_POST(self) -> None:
                if not self._authorised():
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if self.path == "/api/folders":
                    stand_in.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"]}
                    return self._reply(200, stand_in.folders[body["uid"]])
                if self.path == "/api/dashboards/db":
                    model = body["dashboard"]
                    assert body["overwrite"] is True and model.get("id") is None
                    previous = stand_in.dashboards.get(model["uid"], {}).get("dashboard", {})
                    stand_in.saves += 1
                    stand_in.dashboards[model["uid"]] = {
                        "dashboard": {**model, "id": 7, "version": previous.get("version", 0) + 1},
                        "meta": {"folderUid": body["folderUid"]}}
                    return self._reply(200, {"status": "success", "uid": model["uid"]})
                return self._reply(404, {"message": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def grafana() -> Iterator[GrafanaDashboardsStandIn]:
    stand_in = GrafanaDashboardsStandIn()
    yield stand_in
    stand_in.server.shutdown()


def test_push_creates_then_leaves_identical_dashboards_alone_then_updates_changed_ones(
        grafana: GrafanaDashboardsStandIn) -> None:
    first = push(grafana.url, TOKEN)
    assert [(r.name, r.outcome) for r in first] == [(name, "created") for name in NAMES]
    assert grafana.folders == {"gradwatch": {"uid": "gradwatch", "title": "gradwatch"}}
    for name in NAMES:
        saved = grafana.dashboards[f"gradwatch-{name}"]
        assert {k: v for k, v in saved["dashboard"].items() if k not in ("id", "version")} == load(name)
        assert saved["meta"]["folderUid"] == "gradwatch"

    assert [r.outcome for r in push(grafana.url, TOKEN)] == ["unchanged"] * len(NAMES)
    assert grafana.saves == len(NAMES)  # idempotent: nothing saved again

    grafana.dashboards["gradwatch-run"]["dashboard"]["title"] = "edited by hand"
    assert [r.outcome for r in push(grafana.url, TOKEN)] == ["updated", "unchanged", "unchanged"]
    assert grafana.dashboards["gradwatch-run"]["dashboard"]["title"] == load("run")["title"]


def test_a_bad_token_is_one_clear_error(grafana: GrafanaDashboardsStandIn, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PushError, match=r"refused the request: 401.*check --token"):
        push(grafana.url, "wrong")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["dashboards", "push", "--url", grafana.url, "--token", "wrong"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gradwatch: error: Grafana at") and "Traceback" not in err and "wrong" not in err


def test_push_to_nothing_says_it_cannot_reach_grafana() -> None:
    with pytest.raises(PushError, match=re.escape("cannot reach Grafana at http://127.0.0.1:9")):
        push("http://127.0.0.1:9", TOKEN)


def test_export_writes_every_dashboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_main(["dashboards", "export", str(tmp_path / "out")])
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(f"gradwatch-{name}.json" for name in NAMES)
    assert json.loads((tmp_path / "out" / "gradwatch-fleet.json").read_text()) == load("fleet")
    assert capsys.readouterr().out.count("wrote ") == len(NAMES)
