"""The in-process side: hooks that record a training loop into the run spool."""

from gradwatch.probes.probe import Probe, attach

__all__ = ["Probe", "attach"]
