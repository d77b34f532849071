"""Hugging Face Transformers: ``Trainer(..., callbacks=[GradwatchCallback()])``.

The Trainer clips (``max_grad_norm``, 1.0 by default) before ``optimizer.step()``, so the gradient
norm recorded is the result of its own ``clip_grad_norm_`` call, the norm before clipping (the value
it logs as ``grad_norm``). The loss is the scalar the Trainer backpropagates (summed over the
accumulation steps, which it divides by their number); the learning rate is read at the optimizer
step, before the scheduler moves it (what it logs as ``learning_rate``). Actions go through
``TrainerControl``: a stop sets ``control.should_training_stop``; an LR reduction holds as a ratio
to the LR the scheduler sets (probes/lr_cut.py); a clip-threshold change scales ``args.max_grad_norm``. Every other scalar the
Trainer logs is forwarded (``on_log``): ``eval_loss`` (also as ``val_loss``), ``eval_*``, ``epoch``...
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from gradwatch.probes import interceptors
from gradwatch.probes.framework import ProbeOptions, resuming
from gradwatch.probes.identity import shared_launch_id
from gradwatch.probes.optimizers import unwrap
from gradwatch.probes.probe import Probe
from gradwatch.rules.clip import scaled_threshold

#: Recorded at each optimizer step by the probe itself (the Trainer logs them every logging_steps).
_PER_STEP = frozenset({"loss", "grad_norm", "learning_rate"})


class GradwatchCallback(ProbeOptions, TrainerCallback, ExportableState):
    """Watch a Transformers Trainer run with gradwatch; the arguments are those of :func:`gradwatch.attach`.

    The probe's state goes into each checkpoint's ``trainer_state.json`` (a stateful callback), so
    ``trainer.train(resume_from_checkpoint=...)`` continues the same run and step series (whether or not
    ``restore_callback_states_from_checkpoint`` is set)."""

    def _reset(self) -> None:
        self._inputs: interceptors.StepInputs | None = None

    # -- the Trainer saves this with each checkpoint, and restores it as a new callback built from it --------
    def state(self) -> dict[str, Any]:
        options = {k: _json_option(v) for k, v in self.options.items()}
        saved = self.probe.state_dict() if self.probe is not None else getattr(self, "gradwatch_state", None)
        return {"args": options, "attributes": {"gradwatch_state": saved}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        if (self.probe is not None and not self.probe.closed) or optimizer is None:
            return
        self._reset()  # a new train() after an ended one: a new run (from a checkpoint: the run it continues)
        run = self.options["run"] or (args.run_name if args.run_name != args.output_dir else None)
        saved = getattr(self, "gradwatch_state", None) or _saved_state(state)
        self.probe = Probe(model, unwrap(optimizer), rank=args.process_index, world_size=args.world_size,
                           on_stop="flag", launch_id=shared_launch_id(),
                           **{**self.options, "run": run}, **resuming(saved, int(state.global_step), run))
        self._inputs = interceptors.listen(self.probe)  # the loss and the Trainer's clip_grad_norm_ result
        if args.max_grad_norm and args.max_grad_norm > 0:
            def scale_max_grad_norm(factor: float, low: float, high: float) -> float:
                args.max_grad_norm = scaled_threshold(args.max_grad_norm, factor, low, high)
                return args.max_grad_norm

            self.probe.control_clipping(scale_max_grad_norm)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        probe = self.probe
        if probe is None:
            return
        probe.log(batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps)
        if probe.should_stop:
            control.should_training_stop = True  # every rank gets the stop after the same step

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Every scalar the Trainer logs (``eval_loss`` and the other ``eval_*`` after each evaluation, the
        train logs), under its names; ``eval_loss`` also as ``val_loss``, the metric of the shipped
        validation rules. What the probe records per step (loss, grad_norm, learning_rate) is left out."""
        probe = self.probe
        if probe is None or probe.closed or not logs:
            return
        values = {name: float(value) for name, value in logs.items()
                  if isinstance(name, str) and name not in _PER_STEP
                  and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if "eval_loss" in values:
            values["val_loss"] = values["eval_loss"]
        if values:
            probe.log(**values)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._inputs is not None:
            interceptors.stop_listening(self._inputs)
        if self.probe is not None:
            self.probe.close()


def _json_option(value: Any) -> Any:
    """An attach() option as trainer_state.json can keep it: paths as strings, a RulesConfig as its dict."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _saved_state(state: TrainerState) -> dict[str, Any] | None:
    """The probe's state in the trainer_state.json of the checkpoint the Trainer resumes from. The Trainer
    restores callbacks from it only with ``restore_callback_states_from_checkpoint``; the probe's own part
    is read either way."""
    if not state.global_step:
        return None
    stored: Any = state.stateful_callbacks  # loaded from the JSON: a dict by callback class name
    saved = stored.get("GradwatchCallback") if isinstance(stored, dict) else None
    if isinstance(saved, list):  # several of our callbacks: the first one's
        saved = saved[0] if saved else None
    attributes = saved.get("attributes") if isinstance(saved, dict) else None
    probe_state = attributes.get("gradwatch_state") if isinstance(attributes, dict) else None
    return probe_state if isinstance(probe_state, dict) else None
