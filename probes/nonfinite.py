"""Where a non-finite value came from: which parameters' gradients, and which module's forward output.

Nothing runs on healthy steps beyond keeping a reference to the per-tensor norms the fused norm pass made anyway.
When the writer thread reads a step whose gradient norm is non-finite, it looks at those norms (on the GPU: one
copy of that small vector, on the writer thread) and names the parameters, and it arms a forward check for the
next step: forward hooks on every module, for that step only, each flagging a non-finite output on the device;
the flags travel back like any other value, and the first module to finish with a non-finite output is named.
A non-finite gradient with finite forward outputs points at the backward pass (or at that step's batch alone).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from gradwatch.probes import graph_capture, readback
from gradwatch.spool.records import MAX_ORIGIN_PARAMS, NonFiniteRecord

CHECK_EVERY_STEPS = 100  # a run that stays non-finite is checked once per this many steps, not every step


class GradientParts(NamedTuple):
    """What a step keeps to name its non-finite gradients: the per-tensor norms and whose they are."""

    norms: Sequence[torch.Tensor]
    owners: Sequence[int]  # index of each norm's parameter among the meter's parameters
    names: Callable[[], list[str]]  # the meter's parameters' names (computed when needed, on the writer thread)


def _kind(value: float) -> str:
    return "nan" if value != value else "inf"


def layer_of(name: str) -> str:
    return name.rpartition(".")[0] or "(root)"


def gradient_origin(step: int, t: float, parts: GradientParts) -> NonFiniteRecord | None:
    """On the writer thread, for a step whose norm is non-finite: which parameters' gradients were."""
    if graph_capture.active():
        return None
    norms = parts.norms
    values = (torch.stack([n.reshape(()).float() for n in norms]).cpu().tolist() if norms and not norms[0].is_cpu
              else [float(n) for n in norms])
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if not bad:
        return None
    names = parts.names()
    owners = parts.owners

    def name(i: int) -> str:
        owner = owners[i] if i < len(owners) else -1
        return names[owner] if 0 <= owner < len(names) else f"param {owner}"

    bad_names = [name(i) for i in bad]
    # the backward pass runs from the loss back: the parameter nearest the loss (last in model order) met it first
    nearest = bad_names[-1]
    kinds = {_kind(values[i]) for i in bad}
    return NonFiniteRecord(step=step, t=t, source="gradients", module=layer_of(nearest),
                           value="nan" if "nan" in kinds else "inf", params=bad_names[:MAX_ORIGIN_PARAMS],
                           count=len(bad))


class ForwardCheck:
    """The forward hooks of one armed step. ``arm()`` (writer thread) asks for one; the training thread installs
    them at the next forward (``maybe_install``) and collects the flags at the end of that step (``collect``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = weakref.ref(model)
        self._wanted = False  # set by arm() on the writer thread, cleared when the hooks go in
        self._hooks: list[Any] = []
        self._flags: list[torch.Tensor] = []
        self._names: list[str] = []
        self._last_step = -CHECK_EVERY_STEPS

    def arm(self, step: int) -> None:
        if step - self._last_step >= CHECK_EVERY_STEPS:
            self._last_step = step
            self._wanted = True

    @property
    def installed(self) -> bool:
        return bool(self._hooks)

    @property
    def wanted(self) -> bool:
        """A check was asked for (the training thread's per-forward test: one attribute read)."""
        return self._wanted


    def maybe_install(self) -> None:
        """At a forward pass of the model: install the hooks if a check was asked for and none is running."""
        if not self._wanted or self._hooks:
            return
        self._wanted = False
        model = self._model()
        if model is None or hasattr(model, "_orig_mod"):  # torch.compile: hooks would recompile its graphs
            return
        for name, module in model.named_modules():
            self._hooks.append(module.register_forward_hook(self._hook(name or "(root)")))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            tensor = output if isinstance(output, torch.Tensor) else next(
                (o for o in (output if isinstance(output, (tuple, list)) else output.values()
                             if isinstance(output, dict) else ()) if isinstance(o, torch.Tensor)), None)
            if tensor is None or not tensor.is_floating_point():
                return
            with torch.no_grad():
                detached = tensor.detach()
                # 0 finite, 1 NaN, 2 infinite: flags on the device, read back with the step
                code = torch.where(torch.isnan(detached).any(), 1.0, torch.where(torch.isinf(detached).any(), 2.0, 0.0))
            self._flags.append(code.float().reshape(()))
            self._names.append(name)
        return hook

    def collect(self, step: int, t: float) -> readback.Deferred | None:
        """End of the checked step: remove the hooks; the flags as a deferred vector (None: nothing was checked)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        flags, self._flags = self._flags, []
        names, self._names = self._names, []
        if not flags:
            return None
        devices = {f.device for f in flags}
        vector = torch.stack([f.to(flags[0].device) for f in flags]) if len(devices) > 1 else torch.stack(flags)
        return ForwardFlags(step, t, names, readback.capture_vector(vector))


class ForwardFlags(readback.Deferred):
    """The flags of a checked step; ``resolve()`` gives its NonFiniteRecord."""

    __slots__ = ("names", "step", "t", "vector")

    def __init__(self, step: int, t: float, names: list[str], vector: readback.Deferred) -> None:
        self.step, self.t, self.names, self.vector = step, t, names, vector

    def resolve(self) -> Any:
        codes = self.vector.resolve()
        if codes is readback.NOT_READY:
            return codes
        first = next((i for i, c in enumerate(codes) if c), None)
        if first is None:
            return NonFiniteRecord(step=self.step, t=self.t, source="forward")
        return NonFiniteRecord(step=self.step, t=self.t, source="forward", module=self.names[first],
                               value="nan" if codes[first] == 1 else "inf")
