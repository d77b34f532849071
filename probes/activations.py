"""Activation statistics of sampled steps: how many of each activation module's units fire, and how wide its
inputs are (``dead_relu``, ``saturated_activation``, ``poor_weight_initialization``).

A process-wide forward pre-hook watches the activation modules (``nn.ReLU``, ``nn.ReLU6``, ``nn.GELU``,
``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid``) of the model only for the forward passes of a sampled step (armed after
the step before it, removed after it): the other steps cost nothing. A unit is a feature of a linear layer's output (the last
dimension) or a channel of a convolution's (dimension 1); per unit the hooks count, on the device, the (sample,
position) pairs where a ReLU's input is positive (active) or a tanh's / sigmoid's input is outside the bounds
where its gradient is under 1e-7 (saturated), and per module the sum and the sum of squares of its inputs. The
layer that feeds an activation is the last module with a weight matrix or kernel whose forward ran before
it (``Linear`` for ``Linear -> ReLU``, ``Conv2d`` for ``Conv2d -> BatchNorm2d -> ReLU``). Forward passes
in eval mode or under ``no_grad`` (an in-loop evaluation) are not counted; micro-batches of one step
(gradient accumulation) add up. The result travels as one tensor, read back off the training thread without a
synchronisation; per module, at most ``MAX_SHARES`` of the units' shares (sorted, evenly spaced ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from gradwatch.probes import readback

_is_compiling = torch.compiler.is_compiling
#: smdebug's saturation bounds: beyond them tanh's and sigmoid's float32 gradient is under 1e-7
TANH_BOUNDS = (-9.4999, 9.4999)
SIGMOID_BOUNDS = (-23.0, 16.99999)
#: the units' shares a module's figure keeps at most (sorted; evenly spaced ranks of them beyond this)
MAX_SHARES = 256

KINDS: tuple[tuple[type[torch.nn.Module], str], ...] = (
    (torch.nn.ReLU, "relu"), (torch.nn.ReLU6, "relu"), (torch.nn.GELU, "gelu"), (torch.nn.SiLU, "silu"),
    (torch.nn.Tanh, "tanh"), (torch.nn.Sigmoid, "sigmoid"))
#: the kinds whose units are counted: active (relu) or saturated (tanh, sigmoid); GELU and SiLU have a
#: gradient for negative inputs, so an idle unit of theirs is not dead: only their input variance is kept
COUNTED = {"relu", "tanh", "sigmoid"}
_CHANNEL_FIRST_1D = (torch.nn.Conv1d, torch.nn.ConvTranspose1d)


def compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` or a module in it is ``torch.compile``'s wrapper."""
    return any(hasattr(module, "_orig_mod") for module in model.modules())


def activation_kind(module: torch.nn.Module) -> str | None:
    for cls, kind in KINDS:
        if type(module) is cls:  # subclasses may compute something else (a custom ReLU with a threshold)
            return kind
    return None


def _feeds(module: torch.nn.Module) -> bool:
    """A module with a weight matrix or kernel of its own (not a norm layer, not an embedding)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not isinstance(
        module, (torch.nn.Embedding, torch.nn.EmbeddingBag))


class ActivationsCapture(NamedTuple):
    step: int
    t: float
    modules: tuple[str, ...]
    kinds: tuple[str, ...]
    feeders: tuple[str, ...]
    units: tuple[int, ...]
    samples: tuple[int, ...]  # (sample, position) pairs counted per unit
    elements: tuple[int, ...]  # input elements summed per module
    shares: tuple[int, ...]  # how many unit shares each module has in the vector (0: not counted)
    vector: readback.Deferred  # per module: its shares (sorted), then every module's input sum, then sum of squares


@dataclass
class _Seen:
    name: str
    kind: str
    feeder: str
    units: int
    unit_dim: int
    samples: int = 0
    counts: torch.Tensor | None = None  # per unit, on the device
    total: torch.Tensor | None = None  # sum of the inputs, on the device
    squares: torch.Tensor | None = None
    elements: int = 0


@dataclass
class ActivationStats:
    model: torch.nn.Module
    #: what failed in a hook (an input our counting cannot read): reported once by the probe, sampling stops
    error: Exception | None = None
    #: set when a hook ran inside code torch.compile traced (a compiled training step around an eager model):
    #: the probe then stops sampling activations, since hooks added and removed would recompile that code
    under_compile: bool = False
    _armed: bool = False
    _handles: list[Any] = field(default_factory=list)
    _watched: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # id(module) -> name, kind (None: a feeder)
    _seen: dict[str, _Seen] = field(default_factory=dict)  # in the order of the forward pass
    _last_feeder: str = ""
    _ranks: dict[tuple[Any, int], torch.Tensor] = field(default_factory=dict)

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def last_feeder(self) -> str:
        return self._last_feeder

    def arm(self) -> None:
        """Watch the activation modules (and the layers that may feed them) in the next forward passes."""
        if self._armed:
            return
        self._armed = True
        self._seen = {}
        self._last_feeder = ""
        self._watched = {}
        for name, module in self.model.named_modules():
            kind = activation_kind(module)
            if kind is not None or _feeds(module):
                self._watched[id(module)] = (name or "(root)", kind)
        if self._watched:
            # one process-wide pre-hook, not one per module: a hook stored on a module would travel with
            # copy.deepcopy (an EMA or SWA copy made during a sampled step) and break torch.save(model) of it
            self._handles.append(register_module_forward_pre_hook(self._pre_hook))

    def _pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        watched = self._watched.get(id(module))
        if watched is None or self.error is not None:
            return
        if _is_compiling():
            self.under_compile = True
            return
        try:  # it runs inside the script's forward pass: a failure of ours must never become the script's
            self._count(module, args, *watched)
        except Exception as exc:
            self.error = exc  # the probe reports it once, after the step, and stops sampling activations

    def _count(self, module: torch.nn.Module, args: Any, name: str, kind: str | None) -> None:
        if kind is None:
            self._last_feeder = name
            return
        if not module.training or not torch.is_grad_enabled() or not args:
            return
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            self.observe(x, name, kind, module_feeder=self._last_feeder, channel_first=None)

    def observe(self, x: torch.Tensor, name: str, kind: str, module_feeder: str = "",
                channel_first: bool | None = None) -> None:
        """Count one forward input ``x`` of activation ``name`` (``kind`` relu, gelu, silu, tanh or sigmoid)."""
        x = x.detach()
        if x.dim() >= 4:
            unit_dim = 1
        elif x.dim() == 3:
            first = channel_first if channel_first is not None else self._channel_first_1d(module_feeder)
            unit_dim = 1 if first else -1
        else:
            unit_dim = -1
        units = x.shape[unit_dim] if x.dim() else 1
        seen = self._seen.get(name)
        if seen is None:
            seen = self._seen[name] = _Seen(name, kind, module_feeder, units, unit_dim)
        elif seen.units != units:
            return  # a module called at several widths: its first counts
        flat = x.float()  # (a no-op for float32)
        if kind in COUNTED:
            if kind == "relu":
                hits = flat > 0
            else:
                low, high = TANH_BOUNDS if kind == "tanh" else SIGMOID_BOUNDS
                hits = (flat < low) | (flat > high)
            if x.dim():  # per unit: summed over every other dimension, in place (no copy of the input)
                dim = unit_dim % x.dim()
                counts = hits.sum([d for d in range(x.dim()) if d != dim], dtype=torch.float32)
            else:
                counts = hits.reshape(1).float()
            seen.counts = counts if seen.counts is None else seen.counts + counts
            seen.samples += x.numel() // units
        # one pass each, no temporary the size of the input
        total, squares = flat.sum(), torch.linalg.vector_norm(flat).square()
        seen.total = total if seen.total is None else seen.total + total
        seen.squares = squares if seen.squares is None else seen.squares + squares
        seen.elements += x.numel()

    def _channel_first_1d(self, feeder: str) -> bool:
        module = self.model.get_submodule(feeder) if feeder and feeder != "(root)" else None
        return isinstance(module, _CHANNEL_FIRST_1D)

    def release(self) -> None:
        """Remove the process-wide hook (whatever state the counting is in)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._watched = {}
        self._armed = False

    def disarm(self, step: int, t: float) -> ActivationsCapture | None:
        """Remove the hooks; what the sampled step's forward passes counted, for the writer thread."""
        self.release()
        seen, self._seen = [s for s in self._seen.values() if s.total is not None], {}
        if not seen:
            return None
        parts: list[torch.Tensor] = []
        shares: list[int] = []
        with torch.no_grad():
            for s in seen:
                if s.counts is None or not s.samples:
                    shares.append(0)
                    continue
                ordered = (s.counts / float(s.samples)).sort().values
                if s.units > MAX_SHARES:
                    ordered = ordered[self._rank_index(ordered.device, s.units)]
                parts.append(ordered)
                shares.append(ordered.numel())
            # the sums, not the means: dividing by a tensor of the element counts would copy it from pageable
            # memory (a synchronisation); the writer divides
            parts.append(torch.stack([t for s in seen for t in (s.total,) if t is not None]
                                     + [t for s in seen for t in (s.squares,) if t is not None]))
            vector = torch.cat(parts)
        return ActivationsCapture(step, t, tuple(s.name for s in seen), tuple(s.kind for s in seen),
                                  tuple(s.feeder for s in seen), tuple(s.units for s in seen),
                                  tuple(s.samples for s in seen), tuple(s.elements for s in seen), tuple(shares),
                                  readback.capture_vector(vector))

    def _rank_index(self, device: torch.device, units: int) -> torch.Tensor:
        key = (device, units)
        index = self._ranks.get(key)
        if index is None:
            if len(self._ranks) >= 64:
                self._ranks.clear()
            index = self._ranks[key] = torch.linspace(0, units - 1, MAX_SHARES).round().long().to(device)
        return index
