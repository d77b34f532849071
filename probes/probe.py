"""``gradwatch.attach()``: the in-process probe.

Per optimizer step the training thread does only cheap things: a fused gradient-norm pass
(on the device, nothing read back), a few clock reads and one append to a bounded queue.
Reading values back, encoding and file I/O happen on the writer thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.errors import StopTraining
from gradwatch.probes import graph_capture, readback
from gradwatch.probes.acting import Actuator
from gradwatch.probes.activations import ActivationsCapture, ActivationStats, compiled
from gradwatch.probes.autostart import ensure_agent
from gradwatch.probes.batch_size import SampleCounter
from gradwatch.probes.captures import LayersCapture, LogCapture, StepCapture
from gradwatch.probes.collective import command_sync
from gradwatch.probes.commands import CommandApplier
from gradwatch.probes.control import Command
from gradwatch.probes.devices import parameter_devices
from gradwatch.probes.gradnorm import GradNormMeter, NormOfNorms
from gradwatch.probes.guards import GradientGuards
from gradwatch.probes.interceptors import outstanding_scale
from gradwatch.probes.layerstats import LayerStats
from gradwatch.probes.model_hook import ForwardPreHook
from gradwatch.probes.nonfinite import ForwardCheck
from gradwatch.probes.optimizer_streams import OtherOptimizer
from gradwatch.probes.optimizers import GradientSource, ModelParameters, OptimizerSet, unwrap
from gradwatch.probes.record_queue import RecordQueue
from gradwatch.probes.resume import STATE_FORMAT, ResumePoint, resume_point
from gradwatch.probes.runtime import ProcessRuntime, process_runtime
from gradwatch.probes.settings import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_QUEUE,
    OptimizerArg,
    ProbeSettings,
)
from gradwatch.probes.sharding import recognised_sharding, resolve_shard_group
from gradwatch.probes.snapshots import Snapshots
from gradwatch.probes.warn_once import WarnOnce
from gradwatch.probes.writer_thread import SpoolWriterThread
from gradwatch.spool.records import CheckpointRecord, EndStatus

if TYPE_CHECKING:  # pydantic's models load at attach() (ProbeSettings.resolve), not when the probe is imported
    from gradwatch.probes.interceptors import StepInputs
    from gradwatch.rules.config import RulesConfig

log = logging.getLogger("gradwatch")

_is_compiling = torch.compiler.is_compiling


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
        runtime: ProcessRuntime | None = None,
        resume: Mapping[str, Any] | int | None = None,
        first_step: int = 0,
        shard_group: Any = None,
    ) -> None:
        settings = ProbeSettings.resolve(
            model, optimizer, run=run, labels=labels, home=home, rank=rank, world_size=world_size,
            max_queue=max_queue, flush_interval=flush_interval, autostart_agent=autostart_agent, rules=rules,
            on_stop=on_stop, layer_stats_every=layer_stats_every, measure_in_step_hook=measure_in_step_hook,
            launch_id=launch_id)
        self.settings = settings
        self.rules = settings.rules
        self.identity = settings.identity
        self.layout = settings.layout
        self.requested_run = settings.requested_run
        self.step = first_step  # optimizer steps completed (a framework resuming a new run: from its global step)
        self.internal_errors = 0
        self._warn = WarnOnce()
        self._queue = RecordQueue(settings.max_queue, self._warn)
        self._closed = False
        self._hooks: list[Any] = []
        self._runtime = runtime if runtime is not None else process_runtime()
        # what the step hooks carry from before the step to after it
        self._pending_norm: Any = None
        self._pending_guard: Any = None
        self._last_step_end: float | None = None
        self._data_wait: float | None = None
        self._awaiting_forward = False
        # a sampled step's layer and activation samples, queued at the next step (or close), so that probe.log()
        # right after the step still joins the step's record (the writer merges neighbours)
        self._held: list[LayersCapture | ActivationsCapture] = []
        self._layers_measured = False  # this step's per-layer norms were taken (before the script's clip)
        self._clip_norm: tuple[torch.Tensor, int, float | None] | None = None  # the script's clip_grad_norm_
        self._pending_script_clip: float | None = None  # its max_norm, when its result is the recorded norm
        self._closure_step = False
        self._measure_in_step_hook = settings.measure_in_step_hook  # read per step: one attribute, not two
        self._step_inputs: StepInputs | None = None  # the loss when the script does not log it
        self._listening: StepInputs | None = None  # attach(): the script's clip, GradScaler and backward calls
        self._sample_counter: SampleCounter | None = None  # gradwatch run: batch_size from the model's inputs
        self._others: list[OtherOptimizer] = []  # the run's other optimizers, recorded on their own
        self._pre_clip_norm: Any = None  # the first optimizer's own norm, taken before a clip over more
        self._pending_parts: Any = None  # the step's per-tensor norms and their owners (probes/nonfinite.py)
        self._forward_check = ForwardCheck(model) if model is not None else None
        self._names_cache: tuple[int, list[str]] = (0, [])
        self._loss_scaler: torch.amp.GradScaler | None = None  # a framework's GradScaler (use_loss_scaler)

        optimizers = settings.optimizers
        self._optimizers = OptimizerSet(optimizers) if optimizers else None  # what the meters read
        self.primary_optimizer = optimizers[0] if optimizers else None  # whose steps are counted
        watched = self._optimizers
        # without an optimizer, each backward pass is a step (backward_done) measured on the model's gradients;
        # with several, the first's norm is over its own parameters (the others have their own records)
        source: GradientSource | None = (watched.primary if len(watched.members) > 1 else watched) \
            if watched is not None else ModelParameters(model) if model is not None else None
        shard_group = resolve_shard_group(shard_group)
        sharded_by = recognised_sharding(model, optimizers, (p for g in watched.param_groups for p in g["params"])) \
            if watched is not None and shard_group is None else None
        self._sharding = (shard_group, sharded_by)  # every meter of the run's: probes/sharding.py
        self._grad_norm = GradNormMeter(source, *self._sharding) if source is not None else None
        self._layers = LayerStats(model, watched, settings.layer_stats_every) \
            if model is not None and watched is not None and settings.layer_stats_every else None
        self._layer_step = settings.layer_stats_every if self._layers is not None else 0  # next sampled (0: never)
        # activation statistics at the layer samples' steps and at step 1 (an initialisation shows there); not
        # for a compiled model, whose forward a hook added or removed would recompile
        self._activations = ActivationStats(model) if self._layers is not None and model is not None \
            and not compiled(model) else None
        if self._activations is not None:
            self._activations.arm()
        actuator = None
        if self._grad_norm is not None and watched is not None:
            guards = GradientGuards(self.rules.guards, self.rules.dry_run)
            snap = self.rules.guards.snapshots
            snapshots = Snapshots(model, watched, snap.every, snap.keep) if self.rules.snapshots_enabled else None
            actuator = Actuator(watched, self._grad_norm, guards, snapshots)
            if guards.needs_host_norm and any(p.is_cuda for g in watched.param_groups for p in g["params"]):
                self._warn("guards-sync", "guards %s read the gradient norm on the host: one CUDA synchronisation "
                           "per step (see docs/rules.md)", _host_guards(guards))
        self._actuator = actuator
        inbox: deque[Command] = deque()
        self._commands = CommandApplier(inbox, actuator, settings.on_stop, self._warn, self._queue.put)
        # ranks on several machines: rank 0 reads the commands and hands them to the others (probes/collective.py)
        self._sync = command_sync(self.identity.rank, self.identity.world_size, self._warn)
        reads: deque[Command] | None = inbox if self._sync is None else \
            self._sync.incoming if self.identity.rank == 0 else None
        cuda_devices = _cuda_devices(watched)
        if cuda_devices:
            graph_capture.install()  # the probe stays out of CUDA graph captures (probes/graph_capture.py)
        self._writer = SpoolWriterThread(
            queue=self._queue.items, layout=self.layout, run_name=self.requested_run, identity=self.identity,
            labels=settings.labels, queue_dropped=lambda: self._queue.dropped, warn=self._warn,
            flush_interval=settings.flush_interval,
            on_agent_needed=ensure_agent if settings.autostart_agent else None, cuda_devices=cuda_devices,
            param_names=self._parameter_names,
            on_nonfinite=self._forward_check.arm if self._forward_check is not None else None,
            inbox=reads, run_settings={**settings.run_metadata(), "steps_from": "optimizer" if optimizers else "backward",
                                       **({"command_sync": "collective"} if self._sync is not None else {})})
        # Wall time = offset + monotonic clock: one clock read per step instead of two.
        self._wall_offset = time.time() - time.perf_counter()
        if self.primary_optimizer is not None:
            self._hooks.append(self.primary_optimizer.register_step_pre_hook(self._on_step_pre))
            self._hooks.append(self.primary_optimizer.register_step_post_hook(self._on_step_post))
        for optimizer in optimizers[1:]:
            self._record_other(optimizer)
        if model is not None:
            self._hooks.append(ForwardPreHook.register(model, self._on_forward_pre))  # invisible to copies
        if resume is not None:
            self._resume(resume_point(resume, run))
        self._writer.start()
        self.opened_at = time.monotonic()
        self._runtime.opened(self)

    # -- public API ---------------------------------------------------------------------------
    def watch_activation(self, x: torch.Tensor, name: str, kind: str = "relu") -> None:
        """Count ``x`` as the input of an activation called ``name`` at the sampled steps, as the hooks on
        ``nn.ReLU``-like modules do (for ``torch.nn.functional`` users: ``probe.watch_activation(h, "mlp.act")``
        before ``F.relu(h)``). ``kind``: relu, gelu, silu, tanh or sigmoid. Costs one check on other steps."""
        activations = self._activations
        if activations is None or not activations.armed or _is_compiling() or not torch.is_grad_enabled():
            return
        if kind not in ("relu", "gelu", "silu", "tanh", "sigmoid"):
            raise ValueError(f"watch_activation: kind {kind!r} is not one of relu, gelu, silu, tanh, sigmoid")
        try:
            activations.observe(x, name, kind, module_feeder=activations.last_feeder)
        except Exception as exc:
            self.report_internal_error("activation_stats", exc)

    def log(self, **scalars: Any) -> None:
        """Record named scalars (floats, ints or one-element tensors) for the current step.

        ``loss`` is exported as ``gradwatch_loss``; ``batch_size`` gives samples per second;
        every other name as ``gradwatch_metric{name=...}``. Never blocks, never synchronises.
        """
        if self._closed or _is_compiling() or graph_capture.here():
            return  # (a value of a CUDA graph capture is not one of a step)
        try:
            captured = {}
            batch: readback.Batch | None = None  # this call's CUDA values: one copy, one event
            for name, value in scalars.items():
                if value.__class__ is float or value.__class__ is int:
                    captured[name] = value  # the common case, without a function call
                    continue
                try:
                    if isinstance(value, torch.Tensor) and value.is_cuda:
                        batch = batch if batch is not None else readback.Batch()
                        captured[name] = batch.capture(value)
                    else:
                        captured[name] = readback.capture(value)
                except readback.NotAScalar as exc:
                    self._warn(f"log-{name}", "log(%s=...) ignored: %s", name, exc)
            if batch is not None:
                batch.send()
            self._queue.put(LogCapture(self.step, self._wall_offset + time.perf_counter(), captured))
        except Exception as exc:
            self.report_internal_error("log", exc)

    @property
    def should_stop(self) -> bool:
        """True once a rule stopped the run (after the same step on every rank)."""
        return self._commands.should_stop

    @property
    def stop_reason(self) -> str | None:
        return self._commands.stop_reason

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
        self._writer.open_requested.set()
        return self._writer.ready.wait(timeout)

    # -- resuming (checkpoints) ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The probe's state, to save in the training checkpoint: ``ckpt["gradwatch"] = probe.state_dict()``.

        Plain JSON. Given back to a new process (``probe.load_state_dict(...)`` before its first step, or
        ``attach(..., resume=...)``) it continues this run: the same run and step series, the LR cuts and
        clip statistics in force, and the agent's rules in the state they had at this step. The Lightning
        and Transformers callbacks save and restore it with their own checkpoints."""
        checkpoint = f"{self.step}-{secrets.token_hex(4)}"
        state: dict[str, Any] = {"gradwatch": STATE_FORMAT, "run": self.run, "step": self.step,
                                 "checkpoint": checkpoint}
        try:
            state["optimizer_steps"] = {other.name: other.steps for other in self._others}
            if self._actuator is not None:
                state["actions"] = self._actuator.state_dict()
            # the agent keeps its rules' state at this point, under this id
            self._queue.put(CheckpointRecord(step=self.step, t=time.time(), id=checkpoint))
        except Exception as exc:
            self.report_internal_error("state_dict", exc)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run ``state`` (from :meth:`state_dict`) was saved from, after its step. Call it before the
        first step (right after loading the checkpoint); a value that is not such a state raises ValueError."""
        point = resume_point(state, None, "load_state_dict")
        if self.step > 0 or self._writer.opened:
            self._warn("late-resume", "load_state_dict() after the run's first step or record is ignored: call it "
                       "before training starts (this process goes on as run %s)", self.run)
            return
        self._resume(point)

    def _resume(self, point: ResumePoint) -> None:
        self.step = point.step
        self.requested_run = point.run
        self._writer.resume_at(point)
        try:
            steps = point.state.get("optimizer_steps") or {}
            for other in self._others:
                other.steps = int(steps.get(other.name, other.steps))
            actions = point.state.get("actions")
            if self._actuator is not None and isinstance(actions, dict):
                self._actuator.load_state_dict(actions)
        except (TypeError, ValueError, KeyError) as exc:
            self._warn("resume-state", "the saved probe state's actions could not be restored (%s); the run "
                       "continues without them", exc)

    # -- for integrations (the zero-code launcher, Lightning, Transformers) ------------------------
    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch one more optimizer: its parameters join the gradient norm, its groups the learning rates."""
        if self._optimizers is None:
            raise ValueError("add_optimizer: the probe was attached without an optimizer")
        optimizer = unwrap(optimizer)
        if self._optimizers.add(optimizer):
            if len(self._optimizers.members) == 2 and self._grad_norm is not None:  # the first's norm: its own now
                self._grad_norm = GradNormMeter(self._optimizers.primary, *self._sharding)
                if self._actuator is not None:
                    self._actuator.meter = self._grad_norm
            self._record_other(optimizer)

    def _record_other(self, optimizer: torch.optim.Optimizer) -> None:
        other = OtherOptimizer(str(len(self._others) + 1), optimizer, self._queue.put,
                               lambda: self._wall_offset, self.report_internal_error,
                               GradNormMeter(optimizer, *self._sharding))
        other.inputs = self._step_inputs
        if self._actuator is not None:
            other.lr_cut = self._actuator.lr_cut
        self._others.append(other)

    def measure_gradients(self) -> None:
        """Measure the gradients now, for frameworks whose ``optimizer.step()`` runs the backward
        pass itself (Lightning's closure): call it after the backward pass, before clipping. Use with
        ``measure_in_step_hook=False``."""
        if not self._closed:
            self._before_step()

    def _parameter_names(self) -> list[str]:
        """The names of the gradient meter's parameters, as the model names them (writer thread; cached)."""
        meter = self._grad_norm
        if meter is None:
            return []
        params = meter.params
        if self._names_cache[0] != id(params):
            model = self._forward_check._model() if self._forward_check is not None else None
            named = {id(p): name for name, p in model.named_parameters()} if model is not None else {}
            self._names_cache = (id(params), [named.get(id(p), f"param {i}") for i, p in enumerate(params)])
        return self._names_cache[1]

    def created_mid_step(self) -> None:
        """The probe was made inside an optimizer step (``gradwatch run``: by the first ``step()``), after the script
        may have clipped this step's gradients: its per-layer statistics start at the next sampled step, whose
        gradients it sees before the clip."""
        if self._layers is not None and self._layer_step == self.step + 1:
            self._layer_step += self._layers.every

    def use_loss_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """The framework's GradScaler (Lightning's 16-mixed), so that gradients it has not unscaled yet when
        :meth:`measure_gradients` runs (a fused optimizer's) are measured unscaled."""
        self._loss_scaler = scaler

    def count_samples(self, counter: SampleCounter | None) -> None:
        """Log ``batch_size`` with each step the script does not log, from the model's forward inputs."""
        self._sample_counter = counter

    def clips_at(self, max_norm: float) -> None:
        """The framework clips this step's gradients by norm at ``max_norm`` after :meth:`measure_gradients`:
        recorded with the step, with whether it clipped."""
        if self._pending_guard is None:
            self._pending_script_clip = float(max_norm)

    def batch_started(self) -> None:
        """Mark the end of the data wait (when no model forward hook can: the framework calls the
        model another way)."""
        self._on_forward_pre()

    def records(self, optimizer: Any) -> bool:
        """Whether this probe hooks ``optimizer`` (or the framework's wrapper of it)."""
        return self._optimizers is not None and any(unwrap(optimizer) is member for member in self._optimizers.members)

    def steps_with(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` (or the framework's wrapper of it) is the one whose steps the probe counts."""
        return unwrap(optimizer) is self.primary_optimizer

    def use_step_inputs(self, inputs: StepInputs) -> None:
        """Take the loss from ``inputs`` (interceptors: the backward pass) after steps the script did not log."""
        self._step_inputs = inputs
        for other in self._others:
            other.inputs = inputs

    def before_script_clip(self, max_norm: Any) -> Any:
        """The script is about to clip its gradients (interceptors): a sampled step's per-layer norms are
        taken now, before clipping, as the global norm is; returns the ``max_norm`` to clip at (the
        script's, scaled by ``scale_clip`` commands when nothing else clips). ``None``: clip by value."""
        if self._closed:
            return max_norm
        if self.step + 1 == self._layer_step and not self._layers_measured:
            self._measure_layers()
        if self._others:  # each optimizer's own norm, before a clip over all of them
            try:
                if self._pre_clip_norm is None and self._grad_norm is not None:
                    self._pre_clip_norm = self._grad_norm()
                for other in self._others:
                    other.measure()
            except Exception as exc:
                self.report_internal_error("grad_norm", exc)
        actuator = self._actuator
        if actuator is not None and actuator.external_clip is None and isinstance(max_norm, (int, float)) \
                and not isinstance(max_norm, bool):
            return actuator.script_clip_threshold(float(max_norm))
        return max_norm

    def learning_rates(self) -> list[float]:
        """The LR each watched param group's next update uses: the script's, times gradwatch's LR cuts (a
        cut holds as a ratio to whatever the script or its scheduler sets; ``param_group["lr"]`` keeps the
        script's own value between steps)."""
        if self._actuator is not None:
            return self._actuator.learning_rates()
        return [] if self._optimizers is None else [float(g["lr"]) for g in self._optimizers.param_groups]

    def forget_clip_norm(self) -> None:
        """New gradients since the script's clip_grad_norm_: its result, and the norms taken before it, no longer
        describe them."""
        self._clip_norm = None
        if self._others:
            self._pre_clip_norm = None
            for other in self._others:
                other.forget()

    def reuse_clip_norm(self, total_norm: torch.Tensor, n_gradients: int, max_norm: float | None = None) -> None:
        """The script's own ``clip_grad_norm_`` result on the current gradients (before clipping):
        recorded instead of computing the same norm again, if it covered all of them; ``max_norm``,
        its threshold, is recorded with whether the step was clipped."""
        self._clip_norm = (total_norm, n_gradients, max_norm)

    def backward_done(self) -> None:
        """A backward pass from a scalar loss ended (interceptors). Without an optimizer (a script that
        updates its parameters by hand) each one is a step: its gradients are measured now."""
        if self.primary_optimizer is not None or self._closed or self._grad_norm is None or _is_compiling():
            return
        if self._commands.awaiting_lr:
            self._commands.lr_in_effect()  # acknowledgements held for the next step
        self._before_step()
        self._record_step()

    def scaler_stepped(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, stepped_before: int) -> None:
        """``GradScaler.step(optimizer)`` returned. If the optimizer did not step (inf/NaN gradients), record
        the skipped step: the gradients' non-finite norm and the loss scale that overflowed."""
        if self._closed or self.step != stepped_before or not self.steps_with(optimizer):
            return
        try:
            reuse, self._clip_norm = self._clip_norm, None
            norm = self._grad_norm(reuse[:2] if reuse else None) if self._grad_norm is not None else None
            scale = getattr(scaler, "_scale", None)  # the tensor itself: get_scale() would synchronise
            self._pending_norm = norm
            self._pending_script_clip = None
            self._pending_guard = (None, False, "amp", None)
            self._record_step(loss_scale=scale if isinstance(scale, torch.Tensor) else None, skipped=True)
        except Exception as exc:
            self.report_internal_error("GradScaler.step", exc)

    def listen_to_script(self) -> None:
        """Hear the script's own calls (interceptors): its ``clip_grad_norm_`` result, the norm before its
        ``clip_grad_value_``, the steps GradScaler skips and, without an optimizer, its backward passes.
        The loss stays the script's to log."""
        from gradwatch.probes import interceptors

        if self._listening is None and not self._closed:
            self._listening = interceptors.listen(self, record_loss=False)

    def control_clipping(self, scale: Callable[[float, float, float], float] | None) -> None:
        """Hand clip-threshold changes to the framework's own clipping: ``scale(factor, min, max)``
        sets the framework's threshold and returns the new value."""
        actuator = self._actuator
        if actuator is not None:
            actuator.external_clip = scale
            pending, actuator.pending_external_clip = actuator.pending_external_clip, None
            if scale is not None and pending is not None:  # a resumed run: the threshold a scale_clip had set
                actuator.expected_clip_threshold = scale(1.0, pending, pending)

    def close(self, *, status: str | EndStatus = EndStatus.FINISHED, error: str | None = None,
              exit_code: int | None = None, timeout: float = 10.0) -> None:
        """Remove the hooks, write what is queued and mark the run ``finished`` (or ``stopped``,
        ``failed``, ``interrupted``; ``exit_code``: the non-zero status a failed script exits with). Idempotent."""
        if self._closed:
            return
        end = EndStatus(status)  # a wrong value raises here, before anything is closed
        self._closed = True
        if end is EndStatus.FINISHED and self.should_stop:
            end, error = EndStatus.STOPPED, self.stop_reason  # the run ended because a rule stopped it
        for item in self._held:
            self._queue.put(item)
        self._held = []
        self._commands.run_ended()
        if self._actuator is not None:
            self._actuator.lr_cut.close()
        for other in self._others:
            other.close()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._activations is not None and self._activations.armed:
            self._activations.disarm(self.step, 0.0)  # the run ends: its hooks go, what they counted too
        if self._listening is not None:
            from gradwatch.probes import interceptors

            interceptors.stop_listening(self._listening)
            self._listening = None
        self._runtime.closed(self)
        self._writer.stop(status=end, error=error, final_step=self.step, exit_code=exit_code, timeout=timeout)

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close_on(exc)

    def close_on(self, exc: BaseException | None) -> None:
        """Close the probe as the exception ``exc`` (None: none) ends the training: failed, interrupted
        (Ctrl-C, SIGTERM), stopped (StopTraining), or finished."""
        status, error, exit_code = self._runtime.ending(exc, self.opened_at)
        self.close(status=status, error=error, exit_code=exit_code)

    # -- hooks (training thread: keep them cheap) ----------------------------------------------
    def _on_forward_pre(self, module: torch.nn.Module | None = None, args: Any = None) -> None:
        if module is not None and self._sample_counter is not None:
            self._sample_counter.on_forward(module, args)
        check = self._forward_check
        if check is not None and check.wanted and not _is_compiling():
            check.maybe_install()
        if self._awaiting_forward and not _is_compiling() and not graph_capture.here():
            self._awaiting_forward = False
            if self._last_step_end is not None:
                self._data_wait = time.perf_counter() - self._last_step_end

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if graph_capture.here():
            return  # a step being captured into a CUDA graph runs nothing now: nothing to measure or count
        actuator = self._actuator
        if actuator is not None and actuator.lr_cut:
            actuator.lr_cut.apply(optimizer)  # the script has set its LR for this update: cut it, for the update
        if self._commands.awaiting_lr:
            self._commands.lr_in_effect()  # LR changes of the last boundary, with the LR this step uses
        if self._measure_in_step_hook and not _is_compiling():
            if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
                self._closure_step = True  # step(closure) computes the gradients itself: measure after it
                if self._step_inputs is not None:
                    self._step_inputs.start_closure_step()
            else:
                self._before_step()

    def _before_step(self) -> None:
        if self._held:
            for item in self._held:
                self._queue.put(item)
            self._held = []
        if self.step + 1 == self._layer_step and not self._layers_measured:
            self._measure_layers()  # before the guards, which may clip or hide the gradients
        try:
            reuse, self._clip_norm = self._clip_norm, None
            meter = self._grad_norm
            norm, self._pre_clip_norm = self._pre_clip_norm, None
            if norm is None:
                norm = meter(reuse[:2] if reuse else None) if meter is not None else None
                # this step's per-tensor norms, by reference: to name non-finite gradients (probes/nonfinite.py)
                self._pending_parts = (meter.last_parts, meter.grad_owners) \
                    if meter is not None and meter.last_parts is not None else None
            self._pending_script_clip = reuse[2] if reuse is not None and norm is reuse[0] else None
            if norm is None and meter is not None and meter.sharded_by is not None:
                self._warn("sharded-by", "the gradients are sharded (%s): a norm over this rank's shard is not the "
                           "model's, so gradwatch records no gradient norm and its guards do not act; pass "
                           "shard_group= to gradwatch.attach (or GRADWATCH_SHARD_GROUP=world) to have it reduced over "
                           "the ranks (docs/attaching.md)", meter.sharded_by)
            if norm is None and meter is not None and meter.sharded:
                self._warn("sharded-norm", "the gradients are sharded (FSDP2/DTensor): gradwatch records the global "
                           "gradient norm from the script's clip_grad_norm_ call, and no norm on steps without one "
                           "(computing it would add an all-reduce to every step)")
            grad_scale = getattr(self.primary_optimizer, "grad_scale", None)
            if grad_scale is None and norm is not None and self.primary_optimizer is not None:
                grad_scale = outstanding_scale(self.primary_optimizer, self._loss_scaler)  # outside step(): Lightning
            if grad_scale is not None and norm is not None:
                # GradScaler hands fused optimizers scaled gradients and the scale, to unscale in the kernel
                norm = (norm.tensor() if isinstance(norm, NormOfNorms) else norm) / grad_scale
            actuator = self._actuator
            if actuator is not None and norm is not None and actuator.guards.active:
                norm, self._pending_guard = actuator.guard(norm, amp=grad_scale is not None)
            self._pending_norm = norm
        except Exception as exc:
            self._pending_norm = None
            self.report_internal_error("grad_norm", exc)

    def _measure_layers(self) -> None:
        self._layers_measured = True
        try:
            self._layers.before_step()  # type: ignore[union-attr]
        except Exception as exc:
            self.report_internal_error("layer_stats", exc)

    def _on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if _is_compiling() or graph_capture.here():
            return
        if self._closure_step:
            self._closure_step = False
            self._warn("closure", "optimizer.step(closure) computes the gradients inside step(): gradwatch measures "
                       "them after the step, so guards cannot act on them (with Lightning, use "
                       "gradwatch.probes.lightning.GradwatchCallback)")
            self._before_step()
        self._record_step(*self._fused_amp_skip(optimizer))

    def _fused_amp_skip(self, optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
        """A fused optimizer under GradScaler is stepped whatever its gradients, and skips the update inside its
        kernel where GradScaler's ``found_inf`` is set: that step is recorded as skip "amp" with the scale, once
        the flag is read (no synchronisation). () when GradScaler is not in this step."""
        found = getattr(optimizer, "found_inf", None)
        if found is None or not isinstance(found, torch.Tensor):
            return ()
        actuator = self._actuator
        if actuator is not None and actuator.owns_found_inf(found):
            return ()  # the probe's own skip flag, already in the guard's record
        guard = self._pending_guard
        skip = readback.DeviceFlag(found, "amp")
        self._pending_guard = (guard[0], guard[1], skip, guard[3]) if guard is not None else (None, False, skip, None)
        scale = getattr(optimizer, "grad_scale", None)
        return (scale,) if isinstance(scale, torch.Tensor) else ()

    def _record_step(self, loss_scale: Any = None, *, skipped: bool = False) -> None:
        try:
            now = time.perf_counter()
            self.step += 1
            if not self.step % 4096:  # follow wall-clock corrections (NTP) on long runs
                self._wall_offset = time.time() - time.perf_counter()
            duration = None if self._last_step_end is None else now - self._last_step_end
            self._last_step_end = now
            norm, guard = self._pending_norm, self._pending_guard
            self._pending_norm = self._pending_guard = None
            optimizers = self._optimizers
            actuator = self._actuator
            groups = [] if optimizers is None else \
                optimizers.param_groups if not self._others else optimizers.primary.param_groups
            if actuator is not None and actuator.lr_cut:  # the LRs the update used, then the script's back
                cut = actuator.lr_cut
                lrs = [cut.in_effect(group) for group in groups]
                cut.restore(actuator.optimizer)
            else:
                lrs = [group["lr"] for group in groups]
            on_device = norm is not None and norm.__class__ is not float and not isinstance(norm, readback.Deferred) \
                and norm.is_cuda
            if on_device or guard is not None or loss_scale is not None or any(lr.__class__ is not float for lr in lrs):
                norm, lrs, guard, loss_scale = _gathered(norm, lrs, guard, loss_scale)
            parts, self._pending_parts = self._pending_parts, None
            item = StepCapture(self.step, self._wall_offset + now, duration, self._data_wait, norm, lrs,
                               guard, self._pending_script_clip, loss_scale, parts=parts)
            check = self._forward_check
            if check is not None and check.installed:  # this step's forward outputs were checked
                flags = check.collect(self.step, item.t)
                if flags is not None:
                    self._queue.put(flags)
            if self._commands.awaiting_step:
                self._commands.step_recorded(guard[0] if guard is not None else self._pending_script_clip,
                                             guard[2] if guard is not None and isinstance(guard[2], str) else None)
            self._pending_script_clip = None
            self._layers_measured = False
            self._queue.put(item)
            self._data_wait = None
            self._awaiting_forward = True
            inputs = self._step_inputs
            if inputs is not None:  # the script does not log: what the interceptors and the forwards saw
                logged: dict[str, Any] = {}
                loss = inputs.take_loss()
                if loss is not None:
                    logged["loss"] = loss
                samples = self._sample_counter.take() if self._sample_counter is not None else 0
                if samples:
                    logged["batch_size"] = samples
                if logged:
                    self.log(**logged)
            if self._activations is not None:
                self._sample_activations(item.t)
            if self.step == self._layer_step:
                if skipped:  # the layers were not measured before this step: sample the next one instead
                    self._layer_step += self._layers.every  # type: ignore[union-attr]
                else:
                    self._record_layers(item.t)
            if self._actuator is not None:
                self._actuator.after_step(self.step)
            if self._sync is not None:
                self._sync.at_step(self.step, self._commands.inbox)
            if self._commands.inbox:
                self._commands.apply_due(self.step)
        except StopTraining:
            raise
        except Exception as exc:
            self.report_internal_error("step", exc)

    def _sample_activations(self, t: float) -> None:
        """After a step: what its forward passes' activations counted, if they were hooked; hook them for the
        next step if it is sampled."""
        activations = self._activations
        try:
            item = activations.disarm(self.step, t) if activations.armed else None  # type: ignore[union-attr]
            if activations.error is not None:  # type: ignore[union-attr]
                self._activations = None  # off for the rest of the run; this step's partial counts dropped
                self.report_internal_error("activation_stats", activations.error)  # type: ignore[union-attr]
                return
            if item is not None:
                self._held.append(item)
            if activations.under_compile:  # type: ignore[union-attr]
                self._activations = None  # (docs/rules.md: compiled models have no activation samples)
                return
            if self.step + 1 == self._layer_step:
                activations.arm()  # type: ignore[union-attr]
        except Exception as exc:
            self._activations = None  # off for the rest of the run: its hooks must not fail every step
            with contextlib.suppress(Exception):
                activations.release()  # type: ignore[union-attr]  # a process-wide hook must not outlive it
            self.report_internal_error("activation_stats", exc)

    def _record_layers(self, t: float) -> None:
        self._layer_step += self._layers.every  # type: ignore[union-attr]
        try:
            item = self._layers.after_step(self.step, t)  # type: ignore[union-attr]
        except Exception as exc:
            self.report_internal_error("layer_stats", exc)
            return
        if item is not None:
            self._held.append(item)

    def report_internal_error(self, where: str, exc: Exception) -> None:
        """A failure of gradwatch's own code around the training (hooks, wrappers): counted, reported once."""
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
    resume: Mapping[str, Any] | int | None = None,
    shard_group: Any = None,
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
        resume: continue a run that stopped, from a checkpoint: the dict ``probe.state_dict()`` returned
            and the checkpoint kept (the run, its step, the actions in force), or the step the checkpoint
            was taken after (then ``run=`` names the run). Steps are numbered on from there; the agent's
            rules go on from the state they had at that checkpoint (docs/attaching.md, "Resuming").
        shard_group: the ``torch.distributed`` process group over which each rank holds a shard of the gradients
            (FSDP1, DeepSpeed ZeRO, tensor parallelism; not needed for DDP or FSDP2), or ``"world"``: the recorded
            norm, and what the guards act on, is then the model's, reduced over it (one all-reduce of one number
            per step; every rank must attach with it). Default ``$GRADWATCH_SHARD_GROUP`` (``world``) or none.

    Also a context manager: ``with gradwatch.attach(model, opt) as probe: ...`` closes the probe
    and marks the run finished (or failed, on an exception).
    """
    given = list(optimizer) if isinstance(optimizer, (list, tuple)) else [] if optimizer is None else [optimizer]
    existing = process_runtime().probe_on(given)
    if existing is not None:
        # two probes on one optimizer would make two runs of one training, each hook firing twice over
        warnings.warn(f"gradwatch.attach(): this optimizer already has an open probe (run {existing.run!r}); "
                      "returning that probe. Call probe.close() first to attach a new one.", RuntimeWarning,
                      stacklevel=2)
        return existing
    probe = Probe(model, optimizer, run=run, labels=labels, home=home, rank=rank, world_size=world_size,
                  max_queue=max_queue, flush_interval=flush_interval, autostart_agent=autostart_agent, rules=rules,
                  on_stop=on_stop, layer_stats_every=layer_stats_every, resume=resume, shard_group=shard_group)
    probe.listen_to_script()
    return probe


def _gathered(norm: Any, lrs: list[Any], guard: Any, loss_scale: Any) -> tuple[Any, list[Any], Any, Any]:
    """A step's values as the writer thread takes them: CUDA scalars in one batch (one copy, one event), CPU
    tensors read (no synchronisation), a CPU norm's per-tensor norms handed over as they are."""
    batch = readback.Batch()
    if norm is not None and norm.__class__ is not float and not isinstance(norm, readback.Deferred):
        norm = readback.capture_owned(norm) if not norm.is_cuda else batch.add_device(norm)
    lrs = [lr if lr.__class__ is float else batch.capture(lr) for lr in lrs]
    if guard is not None:
        for part in guard:
            if isinstance(part, readback.DeviceFlag) and isinstance(part.value, torch.Tensor):
                part.value = batch.capture(part.value)
        guard = tuple(batch.capture(part) if isinstance(part, torch.Tensor) else part for part in guard)
    if isinstance(loss_scale, torch.Tensor):
        loss_scale = batch.capture(loss_scale)
    batch.send()
    return norm, lrs, guard, loss_scale


def _cuda_devices(optimizer: OptimizerSet | None) -> list[int]:
    """The CUDA devices of the optimizer's parameters (the first is the writer thread's current device), whose
    allocators the writer thread samples and whose UUIDs the metadata lists."""
    if optimizer is None:
        return []
    return parameter_devices(p for group in optimizer.param_groups for p in group["params"])


def _host_guards(guards: GradientGuards) -> str:
    names = [f"clip.scheme={guards.scheme}"] if guards.scheme in ("autoclip", "zclip") else []
    return ", ".join(names + (["skip.on_spike"] if guards.skip_spike != "off" else []))
