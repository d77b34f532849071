"""The Lightning callback's hooks, shared by both package namespaces: ``lightning.pytorch``
(:mod:`gradwatch.probes.lightning`) and the older ``pytorch_lightning``
(:mod:`gradwatch.probes.pytorch_lightning`), whose ``Callback`` classes differ, so each gets its own.

Records what ``gradwatch.attach`` records, at the points Lightning defines: the gradient norm in
``on_before_optimizer_step`` (after the backward pass and AMP's unscaling, before Lightning clips;
Lightning runs the backward pass inside ``optimizer.step(closure)``, too late for the step hook), the
loss ``training_step`` returned, the batch size and data-wait time from ``on_train_batch_start``, and
every scalar in ``trainer.callback_metrics`` after validation and at the end of each training epoch
(each logged value once: the same tensor is not recorded twice), under Lightning's names (``val_loss``
feeds the shipped validation rules). Actions go through the Trainer: a stop sets ``trainer.should_stop``
(on every rank after the same step), an LR reduction holds as a ratio to the LR the schedulers set
(probes/lr_cut.py), and a clip-threshold change scales ``trainer.gradient_clip_val`` when Lightning clips.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gradwatch.probes.framework import ProbeOptions, resuming
from gradwatch.probes.identity import shared_launch_id
from gradwatch.probes.probe import Probe
from gradwatch.rules.clip import scaled_threshold

#: Recorded per step from the training loop itself; an epoch-level copy would count twice.
_PER_STEP = frozenset({"loss", "batch_size"})


class LightningHooks(ProbeOptions):
    """The callback's hooks, for either package namespace (the Trainer is duck-typed here)."""

    def _reset(self) -> None:
        self._manual: Any = None  # manual optimization: the backward passes give each optimizer's loss
        self._loss: Any = None
        self._samples = 0
        self._last_step = 0
        self._forwarded: dict[str, Any] = {}  # the callback metric (a small tensor) last recorded, by name
        self._saved: dict[str, Any] | None = None  # the probe's state from the checkpoint fit() resumes from

    @property
    def state_key(self) -> str:
        return "GradwatchCallback"

    # -- Lightning keeps this in its checkpoints and hands it back to fit(ckpt_path=...) -----------------
    def state_dict(self) -> dict[str, Any]:
        return self.probe.state_dict() if self.probe is not None else dict(self._saved or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = dict(state_dict) if state_dict else None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.probe is not None and not self.probe.closed:
            return
        saved = self._saved
        self._reset()  # a new fit() after an ended one: a new run (or, from a checkpoint, the run it continues)
        self.probe = Probe(pl_module, list(trainer.optimizers), rank=trainer.global_rank,
                           world_size=trainer.world_size, on_stop="flag", measure_in_step_hook=False,
                           launch_id=shared_launch_id(), **self.options,
                           **resuming(saved, int(trainer.global_step), self.options["run"]))
        self._last_step = self.probe.step
        self.probe.use_loss_scaler(getattr(getattr(trainer, "precision_plugin", None), "scaler", None))
        if trainer.gradient_clip_val and (trainer.gradient_clip_algorithm or "norm") == "norm":
            def scale_trainer_clip(factor: float, low: float, high: float) -> float:
                trainer.gradient_clip_val = scaled_threshold(float(trainer.gradient_clip_val or 0.0), factor, low, high)
                return trainer.gradient_clip_val

            self.probe.control_clipping(scale_trainer_clip)
        if not getattr(pl_module, "automatic_optimization", True):
            # training_step steps the optimizers itself (a GAN): each step's loss is that of the
            # manual_backward calls before it, which reach torch's backward
            from gradwatch.probes import interceptors

            self._manual = interceptors.listen(self.probe)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        if self.probe is not None:
            self.probe.batch_started()
            self._samples += batch_size(batch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any,
                                 optimizer: torch.optim.Optimizer) -> None:
        probe = self.probe
        if probe is not None and probe.steps_with(optimizer):
            probe.measure_gradients()  # before the Trainer clips: the recorded norm is the unclipped one
            if trainer.gradient_clip_val and (trainer.gradient_clip_algorithm or "norm") == "norm":
                probe.clips_at(float(trainer.gradient_clip_val))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        probe = self.probe
        if probe is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and self._manual is None:
            # Lightning divides the loss by accumulate_grad_batches: the sum over a step's batches is their mean
            loss = loss.detach()
            self._loss = loss if self._loss is None else self._loss + loss
        if probe.step != self._last_step:  # the optimizer stepped in this batch
            self._last_step = probe.step
            values: dict[str, Any] = {"batch_size": self._samples} if self._samples else {}
            if self._loss is not None:
                values["loss"] = self._loss
            probe.log(**values)
            self._loss, self._samples = None, 0
        if probe.should_stop and not trainer.should_stop:
            trainer.should_stop = True  # every rank gets the stop after the same step

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not getattr(trainer, "sanity_checking", False):  # the sanity check's values are not the run's
            self._forward_metrics(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._forward_metrics(trainer)

    def _forward_metrics(self, trainer: Any) -> None:
        """Every scalar Lightning collected (``self.log``), under its own name, unless it is the very value
        recorded last time (a metric not logged again since; an equal value logged again is recorded: a plateau
        is what the rules look for). Read once per validation or epoch: one small host read each, never per step."""
        probe = self.probe
        if probe is None or probe.closed:
            return
        values: dict[str, float] = {}
        for name, logged in dict(getattr(trainer, "callback_metrics", {}) or {}).items():
            if name in _PER_STEP or not isinstance(name, str) or self._forwarded.get(name) is logged:
                continue  # the same tensor as last time: not logged again since (a plateau logs new ones)
            value = logged.detach().float().item() if isinstance(logged, torch.Tensor) and logged.numel() == 1 \
                else logged
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            self._forwarded[name] = logged
            values[name] = float(value)
        if values:
            probe.log(**values)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_listening()
        if self.probe is not None:
            self.probe.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._stop_listening()
        if self.probe is not None:
            self.probe.close_on(exception)  # Ctrl-C or SIGTERM (Lightning's SIGTERMException): interrupted

    def _stop_listening(self) -> None:
        if self._manual is not None:
            from gradwatch.probes import interceptors

            interceptors.stop_listening(self._manual)
            self._manual = None


def batch_size(batch: Any) -> int:
    """The leading dimension of the first tensor in a batch (a tensor, a sequence or a mapping), else 0."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        for item in batch:
            size = batch_size(item)
            if size:
                return size
    return 0
