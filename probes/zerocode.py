"""``gradwatch run``: instrument an unmodified training script.

The launcher's bootstrap (``gradwatch/_bootstrap/sitecustomize.py``) calls :func:`install` as soon as
the script imports torch. From then on, in this process:

- torch's global optimizer hooks see every ``optimizer.step()``; the first one creates the probe,
  with that optimizer as the one whose steps are counted. Every other optimizer the script created
  (``Optimizer.__init__`` is wrapped to keep a weak reference) or steps later joins it: their
  parameters count in the gradient norm from the first step on, their groups in the learning rates.
- the model is the first module called before that first step (a global forward hook, removed
  at the first step), if it holds the optimizer's parameters: it gives data-wait time and
  per-layer statistics;
- the loss is the scalar the backward pass starts from, a ``clip_grad_norm_`` result is reused,
  and the GradScaler's scaling is undone (see :mod:`gradwatch.probes.interceptors`).

Rank, world size, run name, rules and spool come from the environment the launcher sets up. A stop
decision raises :class:`gradwatch.StopTraining` from ``optimizer.step()`` (``GRADWATCH_ON_STOP=raise``).
Any failure here is logged once; the script runs on unobserved.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradwatch.probes.batch_size import BatchSizeSettingError, SampleCounter, counter_from_environment
from gradwatch.probes.runtime import ProcessRuntime, process_runtime

log = logging.getLogger("gradwatch")

ENV_FLAG = "GRADWATCH_ZERO_CODE"
_lock = threading.Lock()
_session: ZeroCode | None = None


def install() -> ZeroCode:
    """Start watching this process's optimizers (idempotent)."""
    global _session  # noqa: PLW0603 - one per process: torch's hooks and functions are process-wide
    with _lock:
        if _session is None:
            _session = ZeroCode()
        return _session


class ZeroCode:
    def __init__(self, runtime: ProcessRuntime | None = None) -> None:
        self.runtime = runtime if runtime is not None else process_runtime()  # the process's open probes
        self.probe: Any = None
        self.failed = False
        self._first_module: weakref.ref[torch.nn.Module] | None = None
        self._samples = self._sample_counter()  # the first module's training samples, until the probe's hook counts
        self._model_steps_left = 0  # a step(closure) script calls its model inside the first step: adopt it later
        self._step_handle = register_optimizer_step_pre_hook(self._on_any_step_pre)
        self._forward_handle: Any = register_module_forward_pre_hook(self._on_first_forward)
        self._created: list[weakref.ref[torch.optim.Optimizer]] = []  # in creation order: the LR label order
        self._schedulers: list[weakref.ref[Any]] = []  # LR schedulers the script created, for LR cuts to stick
        self._wrap_optimizer_init()
        self._wrap_scheduler_init()
        from gradwatch.probes import interceptors

        self.inputs = interceptors.listen()  # from the start: the first step's loss comes before the probe
        self.inputs.unbound_backward = self._on_backward_without_probe
        self.inputs.unbound_scaler_step = self._on_skipped_first_step

    def _wrap_optimizer_init(self) -> None:
        original = torch.optim.Optimizer.__init__
        created = self._created

        def __init__(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
            original(optimizer, *args, **kwargs)
            try:
                if len(created) < 64:  # bounded: a script creating optimizers in a loop keeps only the first
                    created.append(weakref.ref(optimizer))
            except TypeError:  # not weak-referenceable (a __slots__ subclass): found at its first step instead
                pass

        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        torch.optim.Optimizer.__init__ = __init__  # type: ignore[method-assign,assignment]  # a wrapper, same call

    def _wrap_scheduler_init(self) -> None:
        """Keep a weak reference to every LR scheduler: an LR cut scales their base LRs, so that a schedule
        that recomputes the LR each step (LambdaLR, OneCycleLR, cosine) keeps it, as the callbacks do."""
        from torch.optim.lr_scheduler import LRScheduler

        original = LRScheduler.__init__
        session = self

        def __init__(scheduler: Any, *args: Any, **kwargs: Any) -> None:
            original(scheduler, *args, **kwargs)
            try:
                session._scheduler_created(scheduler)
            except Exception as exc:  # never fail the script's scheduler
                log.debug("gradwatch: could not watch a scheduler (%r)", exc)

        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        LRScheduler.__init__ = __init__  # type: ignore[method-assign,assignment]  # a wrapper, same call

    def _scheduler_created(self, scheduler: Any) -> None:
        if len(self._schedulers) < 64:  # bounded, as the optimizers
            self._schedulers.append(weakref.ref(scheduler))
        if self.probe is not None:
            self._hand_schedulers(self.probe)

    def _hand_schedulers(self, probe: Any) -> None:
        probe.watch_schedulers([s for ref in self._schedulers if (s := ref()) is not None])

    def _on_first_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self._first_module is None:
            self._first_module = weakref.ref(module)
            if self._samples is not None:
                self._samples.use_model(module)
        if self._samples is not None and self._first_module() is module:
            self._samples.on_forward(module, args)  # the forward passes the probe's own hook does not see yet

    @staticmethod
    def _sample_counter() -> SampleCounter | None:
        try:
            return counter_from_environment()
        except BatchSizeSettingError as exc:
            log.error("gradwatch: %s; samples per second are not recorded", exc)
            return None

    def _on_any_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        probe = self.probe
        if probe is not None:
            if self._model_steps_left:
                self._adopt_model(probe, optimizer)
            if optimizer is not probe.primary_optimizer:
                try:
                    probe.add_optimizer(optimizer)  # no-op once known
                except Exception as exc:
                    probe.report_internal_error("zero-code", exc)
            return
        if self.failed:
            return
        try:
            self._start(optimizer)
        except Exception as exc:  # a bad environment value, an unwritable spool...
            self.failed = True
            log.error("gradwatch: could not start watching this script (%s); it runs on unobserved", exc)

    def _on_backward_without_probe(self) -> None:
        """A backward pass ended and no optimizer has stepped. If the script created none, it updates its
        parameters by hand: watch it with the backward passes as steps (no learning rate to read)."""
        if self.probe is not None or self.failed or any(ref() is not None for ref in self._created):
            return
        try:
            probe = self._start(None)
        except Exception as exc:
            self.failed = True
            log.error("gradwatch: could not start watching this script (%s); it runs on unobserved", exc)
            return
        if probe is not None:
            probe.backward_done()  # this backward pass is the first step

    def _on_skipped_first_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """GradScaler skipped the script's first step(s): its optimizer never stepped, so no probe exists yet.
        Start it now, so that the skipped step is recorded."""
        if self.probe is not None or self.failed:
            return
        self._on_any_step_pre(optimizer, (), {})
        probe: Any = self.probe  # set by the call above, when it could start
        if probe is not None:
            probe.scaler_stepped(optimizer, scaler, 0)

    def _start(self, optimizer: torch.optim.Optimizer | None) -> Any:
        """Create the probe (returned; None when the script attached its own or no model can be measured)."""
        from gradwatch.probes import interceptors
        from gradwatch.probes.probe import Probe

        if self.runtime.has_open_probe():
            # the script attached its own probe (gradwatch.attach, the Lightning or Transformers callback):
            # it records the run; `gradwatch run` only passed the settings on
            self.failed = True
            interceptors.stop_listening(self.inputs)
            self._remove_forward_hook()
            log.debug("gradwatch: the script attaches its own probe; gradwatch run adds none")
            return None
        candidate = self._first_module() if self._first_module is not None else None
        if optimizer is None:  # parameters updated by hand: the model is all there is to measure
            if candidate is None or not any(p.grad is not None for p in candidate.parameters()):
                return None  # a backward pass outside any model we saw: wait for one that is
            self._remove_forward_hook()
            self.probe = Probe(candidate, None, on_stop=os.environ.get("GRADWATCH_ON_STOP") or "raise",
                               runtime=self.runtime)
            self.probe.count_samples(self._samples)
            self.inputs.bind(self.probe)
            log.info("gradwatch: watching run %s (rank %d of %d); no torch.optim optimizer, so each backward pass "
                     "counts as a step and there is no learning rate", self.probe.requested_run,
                     self.probe.identity.rank, self.probe.identity.world_size)
            return self.probe
        model = candidate if candidate is not None and _holds_parameters_of(candidate, optimizer) else None
        # the probe's own step hooks, registered now, run for this very step (after the global ones)
        others = [o for ref in self._created if (o := ref()) is not None and o is not optimizer]
        self._created.clear()
        self.probe = Probe(model, [optimizer, *others], on_stop=os.environ.get("GRADWATCH_ON_STOP") or "raise",
                           runtime=self.runtime)
        self.probe.count_samples(self._samples)
        self._hand_schedulers(self.probe)
        if model is not None:
            self._remove_forward_hook()
        else:  # keep looking (and counting samples) through the first steps
            self._model_steps_left = 3
        self.inputs.bind(self.probe)
        log.debug("gradwatch: watching run %s (rank %d of %d)%s", self.probe.requested_run,  # the launcher said so
                 self.probe.identity.rank, self.probe.identity.world_size,
                 "" if model is not None else "; model not found, so no data-wait time or per-layer statistics")
        return self.probe

    def _adopt_model(self, probe: Any, optimizer: torch.optim.Optimizer) -> None:
        """The first step ran without a model (its closure made the first forward pass): take the module
        called first as the model now, or give up after a few steps (the global hook costs every call)."""
        self._model_steps_left -= 1
        module = self._first_module() if self._first_module is not None else None
        if module is not None and _holds_parameters_of(module, optimizer):
            probe.adopt_model(module)
            self._model_steps_left = 0
        if not self._model_steps_left:
            self._remove_forward_hook()

    def _remove_forward_hook(self) -> None:
        if self._forward_handle is not None:
            self._forward_handle.remove()  # every module call paid for it; the first step ends that
            self._forward_handle = None


def _holds_parameters_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return any(id(p) in wanted for p in model.parameters())
