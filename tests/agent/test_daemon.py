"""The agent daemon in-process: endpoints, file events, rescans, a dead watcher, one agent per spool."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradwatch.agent.daemon import Agent, AgentAlreadyRunning
from gradwatch.agent.settings import AgentConfig
from gradwatch.errors import GradwatchError
from tests.agent.helpers import SpoolBuilder
from tests.conftest import http_get, http_json, metric, parse_metrics, wait_until


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    agents: list[Agent] = []

    def start(**settings: object) -> Agent:
        config = AgentConfig(home=tmp_path / "home", port=0, **settings)  # type: ignore[arg-type]
        agent = Agent(config)
        agent.start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()


def _samples(agent: Agent) -> dict:  # type: ignore[type-arg]
    return parse_metrics(http_get(agent.url + "/metrics").decode())


def test_endpoints(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent()
    assert http_json(agent.url + "/healthz")["ok"] is True
    assert http_json(agent.url + "/api/runs") == {"runs": []}
    assert b"/metrics" in http_get(agent.url + "/")
    with pytest.raises(Exception, match="404"):
        http_get(agent.url + "/nope")
    assert metric(_samples(agent), "gradwatch_agent_watcher_up") == 1.0


def test_file_events_bring_new_records_without_waiting_for_a_rescan(start_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(rescan_interval_seconds=3600)
    spool = SpoolBuilder(tmp_path / "home")
    spool.start("live")
    spool.steps("live", 0, 1, 5, loss=0.25)
    wait_until(lambda: metric(_samples(agent), "gradwatch_steps_total", optimizer="0", run="live", rank="0") == 5,
               timeout=20, what="watchdog event to trigger ingest")
    assert metric(_samples(agent), "gradwatch_agent_rescans_total") == 1.0  # only the one at start-up


def test_rescans_catch_what_the_watcher_missed(start_agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(rescan_interval_seconds=0.5)

    def broken_note(path: str) -> None:
        raise RuntimeError("handler bug")

    monkeypatch.setattr(agent.watcher, "note", broken_note)  # every event now raises inside the handler
    spool = SpoolBuilder(tmp_path / "home")
    spool.start("missed")
    spool.steps("missed", 0, 1, 3)
    wait_until(lambda: metric(_samples(agent), "gradwatch_steps_total", optimizer="0", run="missed", rank="0") == 3,
               timeout=20, what="a rescan to ingest the run")
    wait_until(lambda: _samples(agent)[("gradwatch_agent_handler_errors_total", frozenset())] > 0,
               what="the handler's errors counted, not fatal")
    assert agent.watcher.alive()  # the observer thread survived its handler raising


def test_a_dead_watcher_is_restarted_and_reported(start_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(rescan_interval_seconds=3600)
    agent.watcher._observer.stop()  # the observer thread dies (as on an unhandled error)
    wait_until(lambda: metric(_samples(agent), "gradwatch_agent_watcher_restarts_total") == 1.0, timeout=20,
               what="watcher restart")
    spool = SpoolBuilder(tmp_path / "home")
    spool.start("after")
    spool.steps("after", 0, 1, 2)
    wait_until(lambda: metric(_samples(agent), "gradwatch_steps_total", optimizer="0", run="after", rank="0") == 2, timeout=20,
               what="the restarted watcher to see new records")


def test_one_agent_per_spool(start_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = start_agent()
    second = Agent(AgentConfig(home=tmp_path / "home", port=0))
    with pytest.raises(AgentAlreadyRunning, match=rf"already serves .*pid \d+, {first.url}"):
        second.start()


def test_a_busy_port_is_a_clear_error(start_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = start_agent()
    port = int(first.url.rsplit(":", 1)[1])
    other = Agent(AgentConfig(home=tmp_path / "other", port=port))
    with pytest.raises(GradwatchError, match=rf"cannot listen on 127.0.0.1:{port}.*--port or GRADWATCH_PORT"):
        other.start()


def test_stop_saves_a_checkpoint_and_a_new_agent_resumes_from_it(start_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spool = SpoolBuilder(tmp_path / "home")
    spool.start("r")
    spool.steps("r", 0, 1, 10)
    agent = start_agent()
    wait_until(lambda: metric(_samples(agent), "gradwatch_samples_total", run="r", rank="0") == 80.0, timeout=20)
    agent.stop()
    saved = json.loads((tmp_path / "home" / "agent" / "state.json").read_text())
    assert saved["runs"]["r"]["0"]["samples_total"] == 80.0
    spool.steps("r", 0, 11, 12)
    agent = start_agent()
    wait_until(lambda: metric(_samples(agent), "gradwatch_samples_total", run="r", rank="0") == 96.0, timeout=20)
    assert metric(_samples(agent), "gradwatch_agent_records_ingested_total") == 4.0  # only the new records


def test_a_stuck_ingest_loop_makes_healthz_unhealthy(start_agent, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """/healthz follows the loop's heartbeat: a thread that is alive but blocked (a read that never returns)
    is reported, not hidden behind ``is_alive()``."""
    import threading
    import urllib.error

    from gradwatch.agent import daemon

    monkeypatch.setattr(daemon, "_STUCK_LOOP_SECONDS", 1.0)
    agent = start_agent(rescan_interval_seconds=0.2)
    wait_until(lambda: http_json(agent.url + "/healthz")["ok"], what="a healthy agent")
    release = threading.Event()
    monkeypatch.setattr(agent.ingestor, "rescan", lambda: release.wait(60))  # the next rescan blocks

    def unhealthy() -> dict | None:  # type: ignore[type-arg]
        try:
            http_get(agent.url + "/healthz")
        except urllib.error.HTTPError as exc:
            with exc:  # its connection closed now, not when collected (a ResourceWarning in a later test)
                return json.loads(exc.read())  # type: ignore[no-any-return]
        return None

    try:
        report = wait_until(unhealthy, timeout=20, what="/healthz to answer 503")
    finally:
        release.set()
    assert report["ok"] is False and report["ingest_loop"] is False and report["ingest_loop_stuck_seconds"] >= 1
    wait_until(lambda: http_json(agent.url + "/healthz")["ok"], what="healthy again once the loop goes on")


def test_the_watcher_reports_files_made_not_appends(tmp_path: Path) -> None:
    """The spool watch asks the kernel for creations, moves and removals only: a probe appending to its records
    file (kept open) costs no event, whatever its rate; the poll finds appends by the file's size."""
    import time

    from gradwatch.agent.watcher import SpoolWatcher
    from gradwatch.spool.format import SpoolLayout

    runs = tmp_path / "runs"
    watcher = SpoolWatcher(runs)
    watcher.start()
    try:
        run_dir = runs / "r"
        run_dir.mkdir()
        records = SpoolLayout.records_file(run_dir, 0)
        with open(records, "ab") as f:
            wait_until(lambda: "r" in watcher.take_dirty(), what="the new run and file reported")
            time.sleep(0.5)  # the directory's and the file's creation may come as two events: both in by now
            watcher.take_dirty()
            for i in range(200):
                f.write(b'{"kind":"step","step":%d,"t":1.0}\n' % i)
                f.flush()
            time.sleep(0.5)  # what inotify would have delivered by now
            assert watcher.take_dirty() == set()
        SpoolLayout.meta_file(run_dir, 1).write_text("{}")  # a new file, written in one go
        wait_until(lambda: "r" in watcher.take_dirty(), what="the new file reported")
    finally:
        watcher.stop()


def test_appends_are_read_by_the_poll_within_moments_with_no_file_events(start_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(rescan_interval_seconds=3600)
    spool = SpoolBuilder(tmp_path / "home")
    spool.start("r")
    spool.steps("r", 0, 1, 5)
    wait_until(lambda: metric(_samples(agent), "gradwatch_steps_total", run="r", rank="0", optimizer="0") == 5.0)
    agent.watcher.stop()  # no file events at all from here: the poll alone
    spool.steps("r", 0, 6, 9)
    wait_until(lambda: metric(_samples(agent), "gradwatch_steps_total", run="r", rank="0", optimizer="0") == 9.0,
               timeout=10, what="the appended steps read by the poll")
