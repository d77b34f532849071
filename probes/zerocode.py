"""``gradwatch run``: instrument an unmodified training script.

The launcher's bootstrap (``gradwatch/_bootstrap/sitecustomize.py``) calls :func:`install` as soon as
the script imports torch. From then on, in this process:

- torch's global optimizer hooks see every ``optimizer.step()``; the first one creates the probe,
  with that optimizer as the one whose steps are counted. Every other optimizer the script created
  (``Optimizer.__init__`` is wrapped to keep a weak reference) or steps later joins it: their
  parameters count in the gradient norm from the first step on, their groups in the learning rates.
- the model is found at that first step among the modules the script built (``Module.__init__`` is
  wrapped until then to keep weak references; no global module hook, which would be traced by
  ``torch.compile`` and invalidate its graphs when removed): the outermost module holding the
  optimizer's parameters (the ``torch.compile`` or DDP wrapper, whose hooks run outside the compiled
  graph). It gives data-wait time, samples per step and per-layer statistics from the second step on;
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
        self._samples = self._sample_counter()  # the model's training samples, counted by the probe's hook
        self._step_handle = register_optimizer_step_pre_hook(self._on_any_step_pre)
        self._modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # built before the first step
        self._module_init: Any = None  # torch's Module.__init__, while wrapped
        self._created: list[weakref.ref[torch.optim.Optimizer]] = []  # in creation order: the LR label order
        self._wrap_optimizer_init()
        self._wrap_module_init()
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

    def _wrap_module_init(self) -> None:
        original = self._module_init = torch.nn.Module.__init__
        modules = self._modules

        def __init__(module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            original(module, *args, **kwargs)
            try:
                if len(modules) < _MAX_MODULES:
                    modules.add(module)
            except TypeError:  # not weak-referenceable: not a model we can hook anyway
                pass

        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        torch.nn.Module.__init__ = __init__  # type: ignore[method-assign,assignment]  # a wrapper, same call

    def _stop_tracking_modules(self) -> None:
        if self._module_init is not None and getattr(torch.nn.Module.__init__, "__wrapped__", None) is self._module_init:
            torch.nn.Module.__init__ = self._module_init  # type: ignore[method-assign,assignment]
        self._module_init = None
        self._modules = weakref.WeakSet()

    def _find_model(self, holds: Any) -> torch.nn.Module | None:
        """The outermost module built so far for which ``holds(module)`` counts the most parameters."""
        modules = list(self._modules)
        inner = {id(child) for m in modules for child in m._modules.values() if child is not None}
        best, best_count = None, 0
        for module in modules:
            if id(module) in inner:
                continue  # a part of another module (or the module a compile/DDP wrapper holds)
            count = holds(module)
            if count > best_count:
                best, best_count = module, count
        return best

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
            self._stop_tracking_modules()
            log.debug("gradwatch: the script attaches its own probe; gradwatch run adds none")
            return None
        if optimizer is None:  # parameters updated by hand: the model is all there is to measure
            candidate = self._find_model(_with_gradients)
            if candidate is None:
                return None  # a backward pass outside any model we saw: wait for one that is
            self._stop_tracking_modules()
            self.probe = Probe(candidate, None, on_stop=os.environ.get("GRADWATCH_ON_STOP") or "raise",
                               runtime=self.runtime)
            self._count_samples(candidate)
            self.inputs.bind(self.probe)
            log.info("gradwatch: watching run %s (rank %d of %d); no torch.optim optimizer, so each backward pass "
                     "counts as a step and there is no learning rate", self.probe.requested_run,
                     self.probe.identity.rank, self.probe.identity.world_size)
            return self.probe
        model = self._find_model(lambda module: _parameters_of(module, optimizer))
        self._stop_tracking_modules()
        # the probe's own step hooks, registered now, run for this very step (after the global ones)
        others = [o for ref in self._created if (o := ref()) is not None and o is not optimizer]
        self._created.clear()
        self.probe = Probe(model, [optimizer, *others], on_stop=os.environ.get("GRADWATCH_ON_STOP") or "raise",
                           runtime=self.runtime)
        self.probe.created_mid_step()
        if model is not None:
            self._count_samples(model)
        self.inputs.bind(self.probe)
        log.debug("gradwatch: watching run %s (rank %d of %d)%s", self.probe.requested_run,  # the launcher said so
                 self.probe.identity.rank, self.probe.identity.world_size,
                 "" if model is not None else "; model not found, so no data-wait time or per-layer statistics")
        return self.probe


    def _count_samples(self, model: torch.nn.Module) -> None:
        if self._samples is not None:
            self._samples.use_model(model)
            self.probe.count_samples(self._samples)


#: Modules remembered before the first step at most (a script building modules in a loop keeps the first).
_MAX_MODULES = 100_000


def _parameters_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """How many of the optimizer's parameters ``model`` holds."""
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return sum(1 for p in model.parameters() if id(p) in wanted)


def _with_gradients(model: torch.nn.Module) -> int:
    return sum(1 for p in model.parameters() if p.grad is not None)
