"""The probe's hook on the user's model, invisible to ``copy.deepcopy``, ``AveragedModel`` and ``torch.save``.

A module keeps its hooks in its ``__dict__``, so copying or pickling the model copies them. A bound
method of the probe there drags the probe (threads, locks) into every EMA copy and every
``torch.save(model, f)``, which then fail. This hook holds the probe only weakly, and:

- in a copy of the model it does nothing and removes itself at the copy's first forward (a copy is
  told apart by its hook dictionary, which is not the one the hook was registered in);
- pickled, it becomes ``functools.partial(dict.get, {})``: a pass-through pre-hook (it returns the
  forward's own arguments) built from the standard library alone, so a model saved under gradwatch
  loads in a process without it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

_is_compiling = torch.compiler.is_compiling


class ForwardPreHook:
    """``module.register_forward_pre_hook`` for a method of the probe, held weakly."""

    __slots__ = ("__weakref__", "_callback", "_home")

    def __init__(self, callback: Callable[[torch.nn.Module, Any], None], hooks: dict[int, Any]) -> None:
        self._callback = weakref.WeakMethod(callback)  # a bound method of the probe
        self._home = weakref.ref(hooks)  # OrderedDict is weak-referenceable

    @classmethod
    def register(cls, module: torch.nn.Module, callback: Callable[[torch.nn.Module, Any], None]) -> RemovableHandle:
        """Call ``callback(module, args)`` before every forward of ``module`` (not of its copies)."""
        hook = cls(callback, module._forward_pre_hooks)
        return module.register_forward_pre_hook(hook)

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        if _is_compiling():  # traced by torch.compile: nothing to measure, and nothing to trace
            return
        hooks = module._forward_pre_hooks
        if hooks is not self._home():  # a copy of the model: leave it plain
            for key in [key for key, value in hooks.items() if value is self]:
                del hooks[key]  # the forward iterates over a snapshot of the hooks: safe
            return
        callback = self._callback()
        if callback is not None:
            callback(module, args)

    def __deepcopy__(self, memo: dict[int, Any]) -> ForwardPreHook:
        return self  # inert in the copy, and gone after its first forward

    def __copy__(self) -> ForwardPreHook:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial, (dict.get, {})
