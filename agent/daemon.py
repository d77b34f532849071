"""The agent daemon: wires watcher -> ingest -> state -> collector/HTTP, and saves checkpoints."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import IO, Any

from gradwatch import __version__
from gradwatch.agent.actions import ActionDispatcher, ActionNote
from gradwatch.agent.alerts import Alert, AlertTracker
from gradwatch.agent.checkpoint import CheckpointWriter, load_checkpoint
from gradwatch.agent.collector import AgentCollector, utilization_by_run
from gradwatch.agent.gpus import GpuCollector
from gradwatch.agent.ingest import SpoolIngestor
from gradwatch.agent.notify import DeliveryStats, Notifier
from gradwatch.agent.rules import AgentRules
from gradwatch.agent.server import HttpServer, build_app
from gradwatch.agent.settings import AgentConfig
from gradwatch.agent.state import AgentState
from gradwatch.agent.watcher import RulesFileWatcher, SpoolWatcher
from gradwatch.errors import GradwatchError
from gradwatch.spool.files import open_lock_file, private_dir
from gradwatch.spool.format import SpoolLayout
from gradwatch.spool.writer import write_json_atomic

fcntl: ModuleType | None
try:
    import fcntl as _fcntl

    fcntl = _fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("gradwatch.agent")
_LOOP_TICK_SECONDS = 0.5
_REFRESH_SECONDS = 0.1  # runs' states and alerts are decided at most this often (each pass looks at every run)
_IDLE_REFRESH_SECONDS = 2.0  # and this often when nothing was read (a stall, a crash, an alert that resolves)
_HEALTH_LOCK_SECONDS = 5.0
_STUCK_LOOP_SECONDS = 30.0  # a loop pass taking longer than this (or 3 rescan intervals) is reported unhealthy


class AgentAlreadyRunning(GradwatchError):
    pass


class Agent:
    """One per spool (per machine). ``start()`` returns at once; ``stop()`` saves a checkpoint."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time,
                 port_fallback: bool = False) -> None:
        self.port_fallback = port_fallback  # the auto-started agent: a taken port is no reason to leave runs unwatched
        self.config = config
        self.clock = clock
        self.layout = SpoolLayout(config.home)
        self.rules = AgentRules.from_file(config.rules_file)  # a bad rules file stops the start: ConfigError
        self.state = AgentState(spike_window=config.spike_window_seconds, rules=self.rules)
        self.local_host = socket.gethostname()
        self.ingestor = SpoolIngestor(self.layout, self.state, clock, self.local_host, config.stuck_after_seconds)
        self.dispatcher = ActionDispatcher(self.layout, self.state, config.command_lead_seconds,
                                           config.command_min_lead_steps, clock)
        self.watcher = SpoolWatcher(self.layout.runs_dir)
        self.rules_watcher = RulesFileWatcher(config.rules_file, self.watcher.wake) if config.rules_file else None
        self.alerts = AlertTracker(resolve_after=config.alert_resolve_after_seconds, links=config.alert_links())
        self.notifier: Notifier | None = None  # made at start, once the agent's URL is known
        self.gpus = GpuCollector(enabled=config.gpu_collector)  # sampling on its own thread from start()
        self.collector = AgentCollector(self.state, clock, self.watcher.alive, self._alerting, self.gpus,
                                        self.local_host)
        self.stopped = threading.Event()
        self._lock_file: IO[bytes] | None = None
        self._server: HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._idle_since: float | None = None
        self._watcher_errors_seen = 0
        self._started_at: float | None = None
        self._lost_lock = False
        self.checkpoints = CheckpointWriter()  # encodes the runs that changed since its last save
        self._saved_signature: tuple[int, ...] | None = None  # what the last checkpoint saved (see _save_checkpoint)
        self._saved_at = 0.0
        self._heartbeat: float | None = None  # when the ingest loop last completed a pass (monotonic)

    @property
    def url(self) -> str:
        port = self._server.port if self._server else self.config.port
        return f"http://{self.config.host}:{port}"

    def _listen(self, app: Callable[..., Any]) -> HttpServer:
        try:
            return HttpServer(self.config.host, self.config.port, app)
        except GradwatchError as exc:
            if not self.port_fallback or self.config.port == 0:
                raise
            server = HttpServer(self.config.host, 0, app)  # clients find the agent through agent.json
            log.warning("%s; listening on a free port instead: http://%s:%d (clients find it through %s)", exc,
                        self.config.host, server.port, self.layout.agent_info_file)
            return server

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        private_dir(self.layout.agent_dir)
        private_dir(self.layout.runs_dir)
        self._acquire_lock()
        try:
            if load_checkpoint(self.layout.checkpoint_file, self.state, {"alerts": self.alerts}):
                log.info("resumed from checkpoint %s", self.layout.checkpoint_file)
            app = build_app(self.collector.exposition, self._runs_summary, self._health)
            self._server = self._listen(app)
            self._server.start()
            write_json_atomic(self.layout.agent_info_file, {
                "pid": os.getpid(), "url": self.url, "home": str(self.config.home), "version": __version__,
                "started": time.time(),
            })
            self.notifier = Notifier.from_config(self.config, self.url)
            self.notifier.start()
            log.info("alerts go to: %s", self.notifier.describe())
            self.watcher.start()
            self.gpus.start()
            if self.rules_watcher is not None:
                self.rules_watcher.start()
            self._started_at = time.monotonic()  # the loop's first pass reads the whole spool
            self._thread = threading.Thread(target=self._loop, name="gradwatch-ingest", daemon=True)
            self._thread.start()
        except BaseException:
            self._shutdown_parts()
            raise
        log.info("gradwatch agent %s serving %s/metrics for spool %s", __version__, self.url, self.config.home)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.watcher.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._shutdown_parts()

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT (or idle exit), then save state and exit cleanly."""
        self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopped.set())
        try:
            while not self.stopped.wait(1.0):
                pass
        finally:
            self.stopped.clear()
            self.stop()

    def _shutdown_parts(self) -> None:
        self.watcher.stop()
        if self.rules_watcher is not None:
            self.rules_watcher.stop()
        if self._server is not None:
            self._server.stop()
        if self.notifier is not None:
            self.notifier.stop()
        self.gpus.close()
        if not self._lost_lock:
            try:
                self.checkpoints.save(self.layout.checkpoint_file, self.state, {"alerts": self.alerts})
            except OSError as exc:
                log.error("could not save the checkpoint %s: %s", self.layout.checkpoint_file, exc)
            try:
                info = json.loads(self.layout.agent_info_file.read_text())
                if info.get("pid") == os.getpid():
                    self.layout.agent_info_file.unlink()
            except (OSError, ValueError):
                pass
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _acquire_lock(self) -> None:
        if fcntl is None:
            return
        lock = open_lock_file(self.layout.agent_lock_file)  # held open while the agent runs: it is the flock
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise AgentAlreadyRunning(
                f"another gradwatch agent already serves {self.config.home} ({self._describe_running()}); "
                f"stop it first, or point this one at another spool with --home"
            ) from None
        self._lock_file = lock
        if not self._holds_lock_path() and not self._relock():  # deleted or replaced between our open and flock
            raise AgentAlreadyRunning(f"another gradwatch agent took over {self.config.home} while this one started")

    def _holds_lock_path(self) -> bool:
        """Whether ``agent.lock`` is still the file this agent holds the flock of (deleting it would let a
        second agent lock a new file of that name, and both would send every command and event twice)."""
        if self._lock_file is None:
            return True
        try:
            return os.stat(self.layout.agent_lock_file).st_ino == os.fstat(self._lock_file.fileno()).st_ino
        except OSError:
            return False

    def _relock(self) -> bool:
        """``agent.lock`` was deleted or replaced: lock the file now there (made if absent). False when another
        agent holds it: that agent serves the spool now, and this one stops."""
        assert fcntl is not None
        try:
            lock = open_lock_file(self.layout.agent_lock_file)
        except OSError as exc:
            log.error("agent.lock at %s was removed and cannot be made again (%s); stopping, so that a second "
                      "agent cannot serve the spool alongside this one", self.layout.agent_lock_file, exc)
            return False
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            log.error("agent.lock at %s was removed and another agent (%s) has locked it since; stopping this one "
                      "so that the spool has one agent", self.layout.agent_lock_file, self._describe_running())
            self._lost_lock = True  # the spool is the other agent's: its checkpoint and agent.json stay as they are
            return False
        if self._lock_file is not None:
            self._lock_file.close()
        self._lock_file = lock
        log.warning("agent.lock at %s was removed; made again and locked by this agent", self.layout.agent_lock_file)
        return True

    def _describe_running(self) -> str:
        try:
            info = json.loads(self.layout.agent_info_file.read_text())
            return f"pid {info.get('pid')}, {info.get('url')}"
        except (OSError, ValueError):
            return "starting up"

    # -- the ingest loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        cfg = self.config
        next_rescan = time.monotonic()  # the first pass: every run directory
        refreshed_at, changed, refresh_took = 0.0, False, 0.0
        next_checkpoint = time.monotonic() + cfg.checkpoint_interval_seconds
        while not self.stopped.is_set():
            try:
                self.watcher.wake.clear()
                if fcntl is not None and not self._holds_lock_path() and not self._relock():
                    self.stopped.set()
                    return
                if self.rules_watcher is not None and self.rules_watcher.take_change():
                    with self.state.lock:
                        self.rules.reload()
                applied = 0
                if time.monotonic() >= next_rescan:
                    applied += self.ingestor.rescan()  # the first: every run directory
                    next_rescan = time.monotonic() + cfg.rescan_interval_seconds
                dirty = self.watcher.take_dirty()
                if dirty:
                    applied += self.ingestor.scan((self.layout.runs_dir / name for name in sorted(dirty)), read=False)
                applied += self.ingestor.poll()
                notes = self.dispatcher.dispatch(self.ingestor.take_outbox())  # decisions go out at once
                # what follows looks at every run: 10 times a second while records come, else twice
                # (and never more than a tenth of the loop's time: with thousands of runs it takes a while)
                changed = changed or bool(applied or dirty)
                every = max(_REFRESH_SECONDS if changed else _IDLE_REFRESH_SECONDS, 9 * refresh_took)
                if notes or time.monotonic() - refreshed_at >= every:
                    started = time.monotonic()
                    self.dispatcher.prepare_runs()
                    self._refresh()
                    self._alert(notes)
                    refreshed_at, changed = time.monotonic(), False
                    refresh_took = refreshed_at - started
                if time.monotonic() >= next_checkpoint:
                    self._save_checkpoint()
                    # a checkpoint of thousands of busy runs takes a while: at most a tenth of the loop's time
                    # (what a crash then loses is re-read from the saved offsets, never lost or counted twice)
                    next_checkpoint = time.monotonic() + max(cfg.checkpoint_interval_seconds,
                                                             9 * (self.state.counters.checkpoint_seconds or 0.0))
                if self._idle_too_long():
                    log.info("no running run for %.0f s; exiting", cfg.exit_when_idle_seconds)
                    self.stopped.set()
                    return
                pause = min(_LOOP_TICK_SECONDS, max(0.0, self.ingestor.next_poll - time.monotonic()))
            except Exception as exc:  # the loop must survive anything
                with self.state.lock:
                    self.state.counters.handler_errors += 1
                log.exception("error in the ingest loop (continuing): %r", exc)
                pause = _LOOP_TICK_SECONDS  # not at once: an error every pass would spin a core
            self._heartbeat = time.monotonic()
            # until the next rank is due for a look (a woken watcher: at once), at most half a second
            self.watcher.wake.wait(pause)

    def _save_checkpoint(self, force: bool = False) -> None:
        """Save the state when something was read, a run came or went, or an alert changed since the last save
        (an idle agent of thousands of runs then saves nothing); at least once a minute, for what changes with
        time alone (stalled runs, alerts that resolve)."""
        with self.state.lock:
            counters = self.state.counters
            signature = (counters.records_ingested, sum(counters.records_rejected.values()), len(self.state.runs),
                         len(self.state.retired), len(self.alerts.active), self.state.rules.reloads.get("ok", 0))
        if not force and signature == self._saved_signature and time.monotonic() - self._saved_at < 60:
            return
        self._saved_signature, self._saved_at = signature, time.monotonic()
        started = time.perf_counter()
        self.checkpoints.save(self.layout.checkpoint_file, self.state, {"alerts": self.alerts})
        size = self.layout.checkpoint_file.stat().st_size
        with self.state.lock:
            self.state.counters.checkpoint_seconds = time.perf_counter() - started
            self.state.counters.checkpoint_bytes = size

    def _refresh(self) -> None:
        restarted = self.watcher.ensure_alive()
        with self.state.lock:
            counters = self.state.counters
            counters.watcher_restarts += int(restarted)
            counters.handler_errors += self.watcher.errors - self._watcher_errors_seen
            self._watcher_errors_seen = self.watcher.errors
            retired = self.state.refresh(self.clock(), self.config.stall_after_seconds, self.config.ended_ttl_seconds,
                                         self.local_host)
            gpus = self.gpus.sample()
            utilization = utilization_by_run(self.state, gpus, self.local_host) if gpus else None
            # dispatched with the next pass's
            self.ingestor.outbox.extend(self.state.tick_rules(self.clock(), utilization, self.gpus.sampled_at))
        for run in retired:
            log.info("run %s ended more than %.0f s ago; its series are no longer exported", run,
                     self.config.ended_ttl_seconds)

    def _alert(self, notes: list[ActionNote]) -> None:
        changes = self.alerts.evaluate(self.state, self.clock())
        if self.notifier is not None:
            self.notifier.actions(notes)
            with self.state.lock:
                firing = self.alerts.firing()
            self.notifier.alerts(changes, firing)

    def _alerting(self) -> tuple[list[Alert], dict[str, DeliveryStats]]:
        return self.alerts.firing(), self.notifier.stats() if self.notifier is not None else {}

    def _idle_too_long(self) -> bool:
        limit = self.config.exit_when_idle_seconds
        if limit is None:
            return False
        with self.state.lock:
            active = any(not s.status.ended for ranks in self.state.runs.values() for s in ranks.values())
        now = time.monotonic()
        if active:
            self._idle_since = None
            return False
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since > limit

    # -- endpoints ----------------------------------------------------------------------------------
    def _runs_summary(self) -> list[dict[str, Any]]:
        with self.state.lock:
            runs = self.state.summary(self.clock())
            firing: dict[str, list[dict[str, Any]]] = {}
            for alert in self.alerts.firing():
                firing.setdefault(alert.labels["run"], []).append(
                    {"alertname": alert.name, "rank": alert.labels["rank"], "severity": alert.labels["severity"],
                     "summary": alert.annotations.get("summary", ""), "since": alert.starts_at})
        for run in runs:
            run["alerts"] = firing.get(run["run"], [])
        return runs

    def loop_stuck_for(self) -> float | None:
        """Seconds since the ingest loop last completed a pass, when that is longer than it may take (None: it
        is healthy). Its first pass reads the whole spool and gets longer."""
        now = time.monotonic()
        last = self._heartbeat if self._heartbeat is not None else self._started_at
        if last is None:
            return None
        allowed = max(_STUCK_LOOP_SECONDS, 3 * self.config.rescan_interval_seconds)
        if self._heartbeat is None:
            allowed *= 4
        return now - last if now - last > allowed else None

    def _health(self) -> dict[str, Any]:
        ingest_alive = self._thread is not None and self._thread.is_alive()
        stuck = self.loop_stuck_for()
        watcher_alive = self.watcher.alive()
        runs: dict[str, int] = {}
        if self.state.lock.acquire(timeout=_HEALTH_LOCK_SECONDS):  # a loop stuck holding it must not hang /healthz
            try:
                runs = {status.value: n for status, n in self.state.runs_by_status().items()}
                runs["rejected"] = len(self.state.rejected_runs)
            finally:
                self.state.lock.release()
        else:
            stuck = stuck or _HEALTH_LOCK_SECONDS
        faulty = {stage.value: n for stage, n in self.state.faults.faulty_by_stage().items() if n}
        return {"ok": ingest_alive and stuck is None, "ingest_loop": ingest_alive and stuck is None,
                **({"ingest_loop_stuck_seconds": round(stuck, 1)} if stuck is not None else {}),
                "watcher": watcher_alive, "runs": runs, "faulty_runs": faulty,
                "version": __version__, "home": str(self.config.home),
                "gpus": {"count": self.gpus.count, "state": self.gpus.state}}
