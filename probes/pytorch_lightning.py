"""PyTorch Lightning under its older package name (``import pytorch_lightning as pl``):
``Trainer(callbacks=[GradwatchCallback()])``, the same callback as :mod:`gradwatch.probes.lightning`."""

from __future__ import annotations

import pytorch_lightning as pl

from gradwatch.probes.lightning_hooks import LightningHooks

__all__ = ["GradwatchCallback"]


class GradwatchCallback(LightningHooks, pl.Callback):
    """Watch a ``pytorch_lightning`` run with gradwatch; the arguments are those of :func:`gradwatch.attach`."""
