"""The run's other optimizers, when it has several that step in turn (a GAN's discriminator and generator,
actor and critic, one optimizer per part): each gets its own step records, named "1", "2"... in the
order the probe got them ("0" is the first, whose steps are the run's steps and whose records carry no
name). Each record holds that optimizer's step count, the norm of its own parameters' gradients (taken
before the script clips, when it clips), its LRs, and its loss: the backward passes since the last step of
any optimizer, or, when none came since (one backward, then several optimizers), the same loss again.
Guards and commands act through the first optimizer's hooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.probes import readback
from gradwatch.probes.captures import Capture, StepCapture
from gradwatch.probes.gradnorm import GradNormMeter, NormOfNorms

if TYPE_CHECKING:
    from gradwatch.probes.interceptors import StepInputs
    from gradwatch.probes.lr_cut import LRCut


class OtherOptimizer:
    """One more optimizer of the run, recorded on its own (training thread; its hooks are cheap)."""

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, put: Callable[[Capture], None],
                 wall_offset: Callable[[], float], report: Callable[[str, Exception], None],
                 meter: GradNormMeter | None = None) -> None:
        self.name = name
        self.optimizer = optimizer
        self.meter = meter if meter is not None else GradNormMeter(optimizer)
        self.steps = 0
        self.inputs: StepInputs | None = None  # the loss, under gradwatch run
        self.lr_cut: LRCut | None = None
        self._put = put
        self._wall_offset = wall_offset
        self._report = report
        self._last_end: float | None = None
        self._norm: Any = None  # this step's norm, from the pre-step hook or before the script's clip
        self._measured = False
        self._handles = [optimizer.register_step_pre_hook(self._on_step_pre),
                         optimizer.register_step_post_hook(self._on_step_post)]

    def measure(self) -> None:
        """Take this optimizer's norm now (the script is about to clip: afterwards it would be the clipped one)."""
        if not self._measured:
            self._norm = self.meter()
            self._measured = True

    def forget(self) -> None:
        """New gradients (a backward pass) since :meth:`measure`: take the norm again at the step."""
        self._norm, self._measured = None, False

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            return
        try:
            self.measure()
        except Exception as exc:
            self._report("grad_norm", exc)

    def _on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            return
        try:
            now = time.perf_counter()
            self.steps += 1
            duration = None if self._last_end is None else now - self._last_end
            self._last_end = now
            norm, self._norm, self._measured = self._norm, None, False
            if isinstance(norm, (NormOfNorms, torch.Tensor)):
                norm = readback.capture_owned(norm)
            cut = self.lr_cut
            lrs = [cut.in_effect(group) if cut else group["lr"] for group in optimizer.param_groups]
            lrs = [readback.capture(lr) if isinstance(lr, torch.Tensor) else float(lr) for lr in lrs]
            loss = self.inputs.take_loss_or_last() if self.inputs is not None else None
            if isinstance(loss, torch.Tensor):
                loss = readback.capture(loss)
            self._put(StepCapture(self.steps, self._wall_offset() + now, duration, None, norm, lrs, None,
                                  opt=self.name, values=None if loss is None else {"loss": loss}))
        except Exception as exc:
            self._report("step", exc)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
