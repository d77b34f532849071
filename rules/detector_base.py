"""What every detector is: online statistics that say when a rule fires, saved and restored with the agent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from gradwatch.spool.records import ActivationsRecord, LayersRecord


@dataclass(frozen=True)
class Trigger:
    """Why a detector fired: a short reason (a bounded label value) and the numbers behind it. A catalogue
    detector's ``details["evidence"]`` says it in words: rule, step, layer, the figure against the threshold,
    since when, and what to try."""

    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepObservation:
    """One step of the run as the agent interprets its record: metric name -> value (loss, grad_norm, lr,
    step_duration_seconds, data_wait_seconds, the scalars logged with it)."""

    step: int
    t: float
    values: dict[str, float]


@dataclass(frozen=True, slots=True)
class TickObservation:
    """What time alone changes (the agent's clock, twice a second to every 2 s): for the rules that fire on
    what does *not* arrive. ``last_step_t`` and ``start_time`` are the probe's wall clock."""

    now: float
    step: int  # the newest step (0: none yet)
    last_step_t: float | None
    start_time: float | None  # the process's start (the run's metadata)
    ended: bool
    #: the utilisation (0..1) of each GPU the run's ranks use, at the GPU collector's newest reading (taken at
    #: ``gpu_reading_t``, the agent's clock; None: no reading)
    gpu_utilization: tuple[float, ...] = ()
    gpu_reading_t: float | None = None


Observation = StepObservation | LayersRecord | ActivationsRecord | TickObservation


class Detector:
    #: what a catalogue detector reads ("step", "layers", "activations", "tick"); empty: one metric's values,
    #: through update()
    inputs: ClassVar[frozenset[str]] = frozenset()

    def update(self, value: float) -> Trigger | None:
        raise NotImplementedError

    def observe(self, observation: Observation) -> Trigger | None:
        """A catalogue detector's update: a step, or a layer sample."""
        raise NotImplementedError

    def holding(self) -> bool:
        """Whether the condition that triggered still holds after the last update (a NaN streak, a metric
        still over its threshold): alerts stay firing while it does. Events (a spike, a plateau) do not hold."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "spec"}  # JSON writes inf/NaN as Infinity/NaN

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.__dict__:
            if key in state and key != "spec":
                setattr(self, key, state[key])
