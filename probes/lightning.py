"""PyTorch Lightning (``lightning.pytorch``): ``Trainer(callbacks=[GradwatchCallback()])``.

The hooks are in :mod:`gradwatch.probes.lightning_hooks`; for the ``pytorch_lightning`` package use
:mod:`gradwatch.probes.pytorch_lightning`.
"""

from __future__ import annotations

import lightning.pytorch as pl

from gradwatch.probes.lightning_hooks import LightningHooks, batch_size

__all__ = ["GradwatchCallback", "batch_size"]


class GradwatchCallback(LightningHooks, pl.Callback):
    """Watch a Lightning run with gradwatch; the arguments are those of :func:`gradwatch.attach`."""
