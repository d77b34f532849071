"""``gradwatch.attach()``: the in-process probe.

Per optimizer step the training thread does only cheap things: a fused gradient-norm pass
(on the device, nothing read back), a few clock reads and one append to a bounded queue.
Reading values back, encoding and file I/O happen on the writer thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from gradwatch.errors import ConfigError, StopTraining
from gradwatch.probes import readback
from gradwatch.probes.acting import Actuator
from gradwatch.probes.autostart import autostart_enabled, ensure_agent
from gradwatch.probes.captures import AckCapture, Capture, LayersCapture, LogCapture, StepCapture
from gradwatch.probes.control import Command
from gradwatch.probes.gradnorm import GradNormMeter, NormOfNorms
from gradwatch.probes.guards import GradientGuards
from gradwatch.probes.identity import default_run_name, detect_identity
from gradwatch.probes.layerstats import DEFAULT_EVERY as DEFAULT_LAYER_STATS_EVERY
from gradwatch.probes.layerstats import LayerStats
from gradwatch.probes.optimizers import OptimizerSet, unwrap
from gradwatch.probes.snapshots import Snapshots
from gradwatch.probes.warn_once import WarnOnce
from gradwatch.probes.writer import SpoolWriterThread
from gradwatch.rules.config import RulesConfig, default_rules, rules_from
from gradwatch.spool.format import SpoolLayout, default_home
from gradwatch.spool.records import AckStatus, EndStatus

log = logging.getLogger("gradwatch")

DEFAULT_MAX_QUEUE = 10_000
DEFAULT_FLUSH_INTERVAL = 0.05
ON_STOP_CHOICES = ("flag", "raise")
RULES_ENV = "GRADWATCH_RULES_FILE"
LAYER_STATS_ENV = "GRADWATCH_LAYER_STATS_EVERY"

_is_compiling = torch.compiler.is_compiling


OptimizerArg = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


class Probe:
    """Records one training process's steps into the run spool. Create it with :func:`attach`.

    Use ``probe.log(loss=loss, batch_size=n, **other_scalars)`` once per step; gradient
    norm, learning rates, step time and data-wait time are recorded by hooks. When a rule
    stops the run, ``probe.should_stop`` turns True after the same step on every rank.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        optimizer: OptimizerArg = None,
        *,
        run: str | None = None,
        labels: dict[str, str] | None = None,
        home: str | os.PathLike[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        autostart_agent: bool | None = None,
        rules: RulesConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
        on_stop: str | None = None,
        layer_stats_every: int | None = None,
        measure_in_step_hook: bool = True,
        launch_id: str | None = None,
    ) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"gradwatch.attach: model must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = _optimizer_list(optimizer)
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"gradwatch.attach: max_queue must be a positive integer, got {max_queue!r}")
        if not flush_interval > 0:
            raise ValueError(f"gradwatch.attach: flush_interval must be > 0 seconds, got {flush_interval!r}")
        if labels is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise TypeError("gradwatch.attach: labels must map str to str, e.g. labels={'team': 'vision'}")

        layer_stats_every = _layer_stats_every(layer_stats_every)
        on_stop = on_stop or os.environ.get("GRADWATCH_ON_STOP") or "flag"
        if on_stop not in ON_STOP_CHOICES:
            raise ValueError(f"gradwatch.attach: on_stop must be one of {ON_STOP_CHOICES}, got {on_stop!r}")
        self.rules, explicit_rules = _resolve_rules(rules)

        self.identity = detect_identity(rank, world_size, launch_id)
        self.layout = SpoolLayout(Path(home).expanduser() if home is not None else default_home())
        self.requested_run = run if run is not None else default_run_name(self.identity)
        self.step = 0  # optimizer steps completed since attach
        self.internal_errors = 0
        self._queue: deque[Capture] = deque()
        self._max_queue = max_queue
        self._queue_dropped = 0
        self._warn = WarnOnce()
        self._closed = False
        self._pending_norm: Any = None
        self._pending_guard: Any = None
        self._last_step_end: float | None = None
        self._data_wait: float | None = None
        self._awaiting_forward = False
        self._hooks: list[Any] = []
        self.should_stop = False
        self.stop_reason: str | None = None
        self._on_stop = on_stop
        self._inbox: deque[Command] = deque()
        self._held_layers: LayersCapture | None = None
        self._actuator: Actuator | None = None
        self._measure_in_step_hook = measure_in_step_hook
        self._clip_norm: tuple[torch.Tensor, int] | None = None
        self._closure_step = False
        self._step_inputs: Any = None  # interceptors.StepInputs: the loss when the script does not log it
        self._optimizers = OptimizerSet(optimizers) if optimizers else None
        self._primary = optimizers[0] if optimizers else None
        watched = self._optimizers  # what the meters read: every optimizer's param groups

        cuda_device = _cuda_device(watched)
        start_agent = autostart_enabled() if autostart_agent is None else autostart_agent
        self._writer = SpoolWriterThread(
            queue=self._queue,
            layout=self.layout,
            run_name=self.requested_run,
            identity=self.identity,
            labels=dict(labels or {}),
            queue_dropped=lambda: self._queue_dropped,
            warn=self._warn,
            flush_interval=flush_interval,
            on_agent_needed=ensure_agent if start_agent else None,
            cuda_device=cuda_device,
            inbox=self._inbox,
            run_settings={"rules": self.rules.model_dump(mode="json") if explicit_rules else None,
                          "guards": self.rules.guards.model_dump(mode="json"), "dry_run": self.rules.dry_run,
                          "on_stop": on_stop},
        )
        self._grad_norm = GradNormMeter(watched) if watched is not None else None
        self._layers = LayerStats(model, watched, layer_stats_every) \
            if model is not None and watched is not None and layer_stats_every else None
        self._layer_step = layer_stats_every if self._layers is not None else 0  # next sampled step (0: never)
        if self._grad_norm is not None and watched is not None:
            guards = GradientGuards(self.rules.guards, self.rules.dry_run)
            snap = self.rules.guards.snapshots
            snapshots = Snapshots(model, watched, snap.every, snap.keep) if self.rules.snapshots_enabled else None
            self._actuator = Actuator(watched, self._grad_norm, guards, snapshots)
            if guards.needs_host_norm and any(p.is_cuda for g in watched.param_groups for p in g["params"]):
                self._warn("guards-sync", "guards %s read the gradient norm on the host: one CUDA synchronisation "
                           "per step (see docs/rules.md)", _host_guards(guards))
        # Wall time = offset + monotonic clock: one clock read per step instead of two.
        self._wall_offset = time.time() - time.perf_counter()
        if self._primary is not None:
            self._hooks.append(self._primary.register_step_pre_hook(self._on_step_pre))
            self._hooks.append(self._primary.register_step_post_hook(self._on_step_post))
        if model is not None:
            self._hooks.append(model.register_forward_pre_hook(self._on_forward_pre))
        self._writer.start()
        _open_probes.add(self)
        _install_exit_handlers()

    # -- public API ---------------------------------------------------------------------------
    def log(self, **scalars: Any) -> None:
        """Record named scalars (floats, ints or one-element tensors) for the current step.

        ``loss`` is exported as ``gradwatch_loss``; ``batch_size`` gives samples per second;
        every other name as ``gradwatch_metric{name=...}``. Never blocks, never synchronises.
        """
        if self._closed or _is_compiling():
            return
        try:
            captured = {}
            for name, value in scalars.items():
                if value.__class__ is float or value.__class__ is int:
                    captured[name] = value  # the common case, without a function call
                    continue
                try:
                    captured[name] = readback.capture(value)
                except readback.NotAScalar as exc:
                    self._warn(f"log-{name}", "log(%s=...) ignored: %s", name, exc)
            item = LogCapture(self.step, self._wall_offset + time.perf_counter(), captured)
            if len(self._queue) < self._max_queue:
                self._queue.append(item)
            else:
                self._dropped_full()
        except Exception as exc:
            self._internal_error("log", exc)

    @property
    def run(self) -> str:
        """The run's name in the spool and in the ``run`` label (may gain a ``-2`` suffix if taken)."""
        return self._writer.run_name or self.requested_run

    @property
    def run_dir(self) -> Path | None:
        return self._writer.run_dir

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dropped(self) -> int:
        """Records lost so far: queue full, spool unwritable, or not encodable."""
        return self._writer.dropped()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until the run directory exists (for tools and tests; training never needs it)."""
        return self._writer.ready.wait(timeout)

    # -- for integrations (the zero-code launcher, Lightning, Transformers) ------------------------
    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch one more optimizer: its parameters join the gradient norm, its groups the learning rates."""
        if self._optimizers is None:
            raise ValueError("add_optimizer: the probe was attached without an optimizer")
        self._optimizers.add(unwrap(optimizer))

    def measure_gradients(self) -> None:
        """Measure the gradients now, for frameworks whose ``optimizer.step()`` runs the backward
        pass itself (Lightning's closure): call it after the backward pass, before clipping. Use with
        ``measure_in_step_hook=False``."""
        if not self._closed:
            self._before_step()

    def batch_started(self) -> None:
        """Mark the end of the data wait (when no model forward hook can: the framework calls the
        model another way)."""
        self._on_forward_pre(None, None)

    def reuse_clip_norm(self, total_norm: torch.Tensor, n_gradients: int) -> None:
        """The script's own ``clip_grad_norm_`` result on the current gradients (before clipping):
        recorded instead of computing the same norm again, if it covered all of them."""
        self._clip_norm = (total_norm, n_gradients)

    def watch_schedulers(self, schedulers: Sequence[Any]) -> None:
        """LR schedulers of the watched optimizers: an LR reduction also scales their base
        learning rates, so that a schedule that recomputes the LR from them (LambdaLR, warm-up and
        decay) keeps the reduction instead of undoing it at its next step."""
        if self._actuator is not None:
            self._actuator.schedulers = [s for s in schedulers if hasattr(s, "base_lrs")]

    def control_clipping(self, scale: Callable[[float, float, float], float] | None) -> None:
        """Hand clip-threshold changes to the framework's own clipping: ``scale(factor, min, max)``
        sets the framework's threshold and returns the new value."""
        if self._actuator is not None:
            self._actuator.external_clip = scale

    def close(self, *, status: str | EndStatus = EndStatus.FINISHED, error: str | None = None,
              timeout: float = 10.0) -> None:
        """Remove the hooks, write what is queued and mark the run ``finished`` (or ``stopped``,
        ``failed``). Idempotent."""
        if self._closed:
            return
        end = EndStatus(status)  # a wrong value raises here, before anything is closed
        self._closed = True
        if end is EndStatus.FINISHED and self.should_stop:
            end, error = EndStatus.STOPPED, self.stop_reason  # the run ended because a rule stopped it
        if self._held_layers is not None:
            self._enqueue(self._held_layers)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        _open_probes.discard(self)
        self._writer.stop(status=end, error=error, final_step=self.step, timeout=timeout)

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
        elif isinstance(exc, StopTraining):
            self.close(status=EndStatus.STOPPED, error=str(exc))
        else:
            self.close(status=EndStatus.FAILED, error=repr(exc))

    # -- hooks (training thread: keep them cheap) ----------------------------------------------
    def _on_forward_pre(self, module: torch.nn.Module | None, args: Any) -> None:
        if self._awaiting_forward and not _is_compiling():
            self._awaiting_forward = False
            if self._last_step_end is not None:
                self._data_wait = time.perf_counter() - self._last_step_end

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._measure_in_step_hook and not _is_compiling():
            if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
                self._closure_step = True  # step(closure) computes the gradients itself: measure after it
            else:
                self._before_step()

    def _before_step(self) -> None:
        if self._held_layers is not None:
            self._enqueue(self._held_layers)
            self._held_layers = None
        if self.step + 1 == self._layer_step and self._layers is not None:
            try:
                self._layers.before_step()  # before the guards, which may clip or hide the gradients
            except Exception as exc:
                self._internal_error("layer_stats", exc)
        try:
            reuse, self._clip_norm = self._clip_norm, None
            norm = self._grad_norm(reuse) if self._grad_norm is not None else None
            grad_scale = getattr(self._primary, "grad_scale", None)
            if grad_scale is not None and norm is not None:
                # GradScaler hands fused optimizers scaled gradients and the scale, to unscale in the kernel
                norm = (norm.tensor() if isinstance(norm, NormOfNorms) else norm) / grad_scale
            actuator = self._actuator
            if actuator is not None and norm is not None and actuator.guards.active:
                norm, self._pending_guard = actuator.guard(norm)
            self._pending_norm = norm
        except Exception as exc:
            self._pending_norm = None
            self._internal_error("grad_norm", exc)

    def _on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if _is_compiling():
            return
        if self._closure_step:
            self._closure_step = False
            self._warn("closure", "optimizer.step(closure) computes the gradients inside step(): gradwatch measures "
                       "them after the step, so guards cannot act on them (with Lightning, use "
                       "gradwatch.probes.lightning.GradwatchCallback)")
            self._before_step()
        try:
            now = time.perf_counter()
            self.step += 1
            if not self.step % 4096:  # follow wall-clock corrections (NTP) on long runs
                self._wall_offset = time.time() - time.perf_counter()
            duration = None if self._last_step_end is None else now - self._last_step_end
            self._last_step_end = now
            norm, guard = self._pending_norm, self._pending_guard
            self._pending_norm = self._pending_guard = None
            lrs = [lr if lr.__class__ is float else readback.capture(lr)
                   for lr in [group["lr"] for group in self._optimizers.param_groups]]  # type: ignore[union-attr]
            item = StepCapture(self.step, self._wall_offset + now, duration, self._data_wait,
                               norm if norm is None or norm.__class__ is float else readback.capture_owned(norm), lrs,
                               guard)
            if len(self._queue) < self._max_queue:
                self._queue.append(item)
            else:
                self._dropped_full()
            self._data_wait = None
            self._awaiting_forward = True
            inputs = self._step_inputs
            if inputs is not None and inputs.loss is not None:
                self.log(loss=inputs.take_loss())
            if self.step == self._layer_step:
                self._record_layers(item.t)
            if self._actuator is not None:
                self._actuator.after_step(self.step)
            if self._inbox:
                self._apply_commands()
        except StopTraining:
            raise
        except Exception as exc:
            self._internal_error("step", exc)

    def _record_layers(self, t: float) -> None:
        self._layer_step += self._layers.every  # type: ignore[union-attr]
        try:
            item = self._layers.after_step(self.step, t)  # type: ignore[union-attr]
        except Exception as exc:
            self._internal_error("layer_stats", exc)
            return
        # queued at the next step (or close), so that probe.log() right after this step still joins the step record
        self._held_layers = item

    # -- commands of the agent (training thread, between two steps) -------------------------------
    def _apply_commands(self) -> None:
        raise_stop = None
        for command in list(self._inbox):
            due = command.apply_at_step
            if due is not None and due > self.step:
                continue  # other ranks are not there yet either
            self._inbox.remove(command)
            status = AckStatus.LATE if due is not None and self.step > due else AckStatus.APPLIED
            try:
                if command.type == "stop":
                    self.should_stop = True
                    self.stop_reason = f"rule {command.rule}: {command.reason} (step {command.trigger_step})"
                    detail = "should_stop set" + (", StopTraining raised" if self._on_stop == "raise" else "")
                    log.warning("gradwatch: stopping the run after step %d: %s%s", self.step, self.stop_reason,
                                "; raising gradwatch.StopTraining" if self._on_stop == "raise" else "")
                    if self._on_stop == "raise":
                        raise_stop = StopTraining(f"gradwatch stopped the run: {self.stop_reason}")
                elif self._actuator is None:
                    raise ValueError("the probe has no optimizer to act on; pass it to gradwatch.attach()")
                else:
                    detail = self._actuator.execute(command)
            except ValueError as exc:
                status, detail = AckStatus.REJECTED, str(exc)
            if status is AckStatus.LATE:
                self._warn("late-command", "command %s arrived after its step %s (now %d); applied now, ranks may "
                           "disagree", command.id, due, self.step)
            self._enqueue(AckCapture(self.step, time.time(), command, status, detail))
        if raise_stop is not None:
            raise raise_stop

    def _enqueue(self, item: Capture) -> None:
        if len(self._queue) < self._max_queue:
            self._queue.append(item)
        else:
            self._dropped_full()

    def _dropped_full(self) -> None:
        self._queue_dropped += 1
        self._warn("queue-full", "record queue full (%d); records are dropped and counted, training goes on",
                   self._max_queue)

    def _internal_error(self, where: str, exc: Exception) -> None:
        self.internal_errors += 1
        self._warn(f"internal-{where}", "internal error in %s hook (%r); training goes on", where, exc)


def attach(
    model: torch.nn.Module | None = None,
    optimizer: OptimizerArg = None,
    *,
    run: str | None = None,
    labels: dict[str, str] | None = None,
    home: str | os.PathLike[str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    autostart_agent: bool | None = None,
    rules: RulesConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
    on_stop: str | None = None,
    layer_stats_every: int | None = None,
) -> Probe:
    """Monitor a training loop: ``probe = gradwatch.attach(model, optimizer, run="lr-sweep-3e-4")``.

    Args:
        model: hooked to measure data-wait time (time from one optimizer step to the next forward).
        optimizer: hooked to record the global gradient norm, learning rates and step time. Several
            optimizers (a list): steps are counted on the first; the norm covers all their parameters.
        run: run name (default ``$GRADWATCH_RUN`` or ``<script>-<launch id>``); ranks of one launch share it.
        labels: extra run metadata, shown in ``gradwatch_run_info``.
        home: spool directory (default ``$GRADWATCH_HOME`` or ``~/.local/share/gradwatch``).
        rank, world_size: default from torch.distributed, else the ``RANK``/``WORLD_SIZE`` env vars.
        max_queue: records held in memory at most; beyond that records are dropped and counted.
        flush_interval: seconds between writes of the background thread.
        autostart_agent: start ``gradwatch agent`` if none serves the spool (default ``$GRADWATCH_AUTOSTART`` or on).
        rules: a RulesConfig, a dict shaped like a rules file, or a path to one (default
            ``$GRADWATCH_RULES_FILE``, else the agent's rules and the packaged guards; docs/rules.md).
            The guards act in this process; the rules travel to the agent with the run's metadata.
        on_stop: what a stop decision does: ``"flag"`` sets ``probe.should_stop`` (default,
            ``$GRADWATCH_ON_STOP``); ``"raise"`` also raises :class:`gradwatch.StopTraining` from
            ``optimizer.step()``, for scripts that do not check the flag.
        layer_stats_every: every how many optimizer steps to record per-layer gradient norms and
            update/weight ratios (default ``$GRADWATCH_LAYER_STATS_EVERY`` or 100; 0 turns them off;
            needs the model). The sampled step costs a few extra kernels and a bounded copy of some layers.

    Also a context manager: ``with gradwatch.attach(model, opt) as probe: ...`` closes the probe
    and marks the run finished (or failed, on an exception).
    """
    return Probe(model, optimizer, run=run, labels=labels, home=home, rank=rank, world_size=world_size,
                 max_queue=max_queue, flush_interval=flush_interval, autostart_agent=autostart_agent, rules=rules,
                 on_stop=on_stop, layer_stats_every=layer_stats_every)


def _resolve_rules(rules: Any) -> tuple[RulesConfig, bool]:
    """(the rules, whether they were given explicitly). A bad ``rules=`` argument raises ConfigError; a
    bad ``$GRADWATCH_RULES_FILE`` is logged and the defaults are used (the script did not ask in code)."""
    if rules is not None:
        return rules_from(rules), True
    path = os.environ.get(RULES_ENV)
    if path:
        try:
            return rules_from(Path(path)), True
        except ConfigError as exc:
            log.error("gradwatch: %s (from %s); using the default rules", exc, RULES_ENV)
    return default_rules(), False


def _layer_stats_every(value: int | None) -> int:
    if value is None:
        env = os.environ.get(LAYER_STATS_ENV)
        if env is None:
            return DEFAULT_LAYER_STATS_EVERY
        try:
            value = int(env)
        except ValueError:
            log.error("gradwatch: %s=%r is not an integer; using %d", LAYER_STATS_ENV, env, DEFAULT_LAYER_STATS_EVERY)
            return DEFAULT_LAYER_STATS_EVERY
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"gradwatch.attach: layer_stats_every must be an integer >= 0 (0: off), got {value!r}")
    return value


def _optimizer_list(optimizer: OptimizerArg) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    items = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    found = [unwrap(item) for item in items]
    for item in found:
        if not isinstance(item, torch.optim.Optimizer):
            raise TypeError("gradwatch.attach: optimizer must be a torch.optim.Optimizer or a list of them, "
                            f"got {type(item).__name__}")
    if not found:
        raise ValueError("gradwatch.attach: optimizer is an empty list; pass at least one optimizer or None")
    return found


def _cuda_device(optimizer: OptimizerSet | None) -> int | None:
    """The CUDA device of the optimizer's first parameter, whose allocator the writer thread samples."""
    if optimizer is None:
        return None
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.is_cuda:
                return None
            return p.device.index if p.device.index is not None else torch.cuda.current_device()
    return None


def _host_guards(guards: GradientGuards) -> str:
    names = [f"clip.scheme={guards.scheme}"] if guards.scheme in ("autoclip", "zclip") else []
    return ", ".join(names + (["skip.on_spike"] if guards.skip_spike != "off" else []))


# -- process exit: close what is open, mark runs that died of an exception as failed --------------
_open_probes: weakref.WeakSet[Probe] = weakref.WeakSet()
_uncaught: list[BaseException] = []
_exit_handlers_lock = threading.Lock()
_exit_handlers_installed = False


def _install_exit_handlers() -> None:
    global _exit_handlers_installed  # noqa: PLW0603 - one per process: torch's hooks and functions are process-wide
    with _exit_handlers_lock:
        if _exit_handlers_installed:
            return
        _exit_handlers_installed = True
        previous = sys.excepthook

        def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
            _uncaught.append(exc)
            previous(exc_type, exc, tb)

        sys.excepthook = excepthook
        atexit.register(_close_open_probes)


def _close_open_probes() -> None:
    pid = os.getpid()
    for probe in list(_open_probes):
        if probe.identity.pid != pid:
            continue  # a forked child (e.g. a DataLoader worker) does not own the parent's probes
        if _uncaught and isinstance(_uncaught[-1], StopTraining):
            probe.close(status=EndStatus.STOPPED, error=str(_uncaught[-1]), timeout=5.0)
        elif _uncaught:
            probe.close(status=EndStatus.FAILED, error=repr(_uncaught[-1]), timeout=5.0)
        else:
            probe.close(timeout=5.0)
