"""Spike statistics must not be poisoned by what they are meant to catch."""

from __future__ import annotations

import math
import random

import pytest

from gradwatch.agent.recent_max import BUCKETS, RecentMax
from gradwatch.rules.ema import EmaZScore as SpikeDetector


def _warmed(values: int = 50, seed: int = 0) -> SpikeDetector:
    rng = random.Random(seed)
    detector = SpikeDetector()
    for _ in range(values):
        assert not detector.update(1.0 + rng.gauss(0, 0.05))
    return detector


def test_a_spike_after_warm_up_is_detected_and_ordinary_noise_is_not() -> None:
    detector = _warmed()
    assert detector.update(3.0)
    rng = random.Random(1)
    assert not any(detector.update(1.0 + rng.gauss(0, 0.05)) for _ in range(200))


def test_nothing_is_flagged_during_warm_up() -> None:
    detector = SpikeDetector(warmup=20)
    assert not any(detector.update(v) for v in [1.0] * 10 + [100.0] + [1.0] * 9)


def test_nan_and_inf_never_enter_the_statistics() -> None:
    detector = _warmed()
    before = detector.state_dict()
    for bad in (math.nan, math.inf, -math.inf):
        assert not detector.update(bad)
    assert detector.state_dict() == before
    assert detector.update(3.0)  # still detects


def test_a_detected_spike_does_not_move_the_statistics() -> None:
    detector = _warmed()
    before = detector.state_dict()
    assert detector.update(50.0)
    assert {k: v for k, v in detector.state_dict().items() if k != "in_a_row"} == \
           {k: v for k, v in before.items() if k != "in_a_row"}
    assert detector.update(3.0)  # a second, smaller spike right after is still caught


def test_a_lasting_level_shift_is_adopted_after_readapt_after_values() -> None:
    detector = _warmed()
    flagged = [detector.update(5.0) for _ in range(detector.readapt_after)]
    assert all(flagged)
    rng = random.Random(2)
    # statistics restarted at the new level: after a new warm-up, 5 +- noise is normal again
    results = [detector.update(5.0 + rng.gauss(0, 0.05)) for _ in range(100)]
    assert not any(results)


def test_state_round_trips() -> None:
    detector = _warmed()
    copy = SpikeDetector()
    copy.load_state_dict(detector.state_dict())
    assert copy.state_dict() == detector.state_dict()


def test_recent_max_keeps_a_spike_visible_for_the_window_only() -> None:
    window = RecentMax(window=10.0)
    window.add(0.0, 1.0)
    window.add(1.0, 9.0)  # a one-step spike between two scrapes
    window.add(2.0, 1.0)
    window.add(2.5, math.nan)
    assert window.value(now=5.0) == 9.0
    assert window.value(now=11.5) == 1.0  # the spike left the window, the later value is still in it
    assert window.value(now=13.0) is None


def test_recent_max_holds_a_bounded_number_of_values_whatever_the_rate() -> None:
    """A falling loss at 20 steps/s: every value is a new minimum, none may be forgotten by a plain monotonic
    deque, and 5,000 ranks of them filled the agent's memory."""
    window = RecentMax(window=60.0)
    for i in range(20 * 600):
        window.add(1000.0 + i / 20, 100.0 - i * 0.001)
    assert len(window.state_dict()) <= BUCKETS + 2  # the slices of the window, and one at each edge
    # the largest value of the last 60 s, to one slice (1 s: 20 steps of 0.001)
    assert window.value(now=1000.0 + 600) == pytest.approx(100.0 - (20 * 540) * 0.001, abs=0.021)
    restored = RecentMax(window=60.0)
    restored.load_state_dict(window.state_dict())
    assert restored.value(now=1600.0) == window.value(now=1600.0)
