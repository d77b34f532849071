"""``gradwatch inspect``: a plain-text diagnosis of a recorded run, with step numbers and what to try.

Deciding only: each check reads the run's history (gradwatch.history) and returns findings; the CLI prints them.
The checks and their thresholds (documented in docs/debugging.md):

- non-finite steps (loss or gradient norm NaN/inf), with where the value came from (the probe's nonfinite records);
- loss and gradient-norm spikes: a step over 6 robust standard deviations (median absolute deviation) above the
  median of the 50 steps before it, with the LR and batch there and the layers that moved first
  (gradwatch.forensics);
- layers: dead (a gradient norm of 0 at every one of the last 3 or more samples), exploding (a layer's gradient
  norm over 100x its first sample and 10x the median layer's), vanishing gradients (the first layer's norm under
  1/1000 of the last layer's, model order), update/weight ratios far from the usual 1e-4 .. 1e-2 (median over
  samples above 0.1 or below 1e-6);
- the input pipeline: data wait over 30 % of the step time (median over the second half of the run);
- a plateau: no improvement of the loss (val_loss when logged) by 1 % over the last 40 % of the run (50 steps or more);
- clipping: the threshold in force clipped 90 % or more of the steps of the second half.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gradwatch.forensics import spike_forensics
from gradwatch.history import RankHistory, RunHistory

SPIKE_WINDOW = 50
SPIKE_Z = 6.0
PLATEAU_FRACTION = 0.4
PLATEAU_MIN_STEPS = 50
PLATEAU_IMPROVEMENT = 0.01
INPUT_BOUND_FRACTION = 0.3
CLIPPED_FRACTION = 0.9
RATIO_HIGH, RATIO_LOW = 0.1, 1e-6


@dataclass(frozen=True)
class Finding:
    kind: str  # nonfinite, spike, dead_layer, exploding_layer, vanishing_gradients, update_ratio, input_bound,
    # plateau, clipping
    severity: str  # problem, warning, note
    steps: str  # "step 1234", "steps 100-250"
    what: str
    advice: str
    details: tuple[str, ...] = ()  # evidence under the finding (a spike's forensics)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def diagnose(run: RunHistory, rank_number: int = 0) -> list[Finding]:
    rank = run.rank(rank_number)
    findings: list[Finding] = []
    for check in (_nonfinite, _spikes, _layers, _input_bound, _plateau, _clipping):
        findings += check(rank)
    order = {"problem": 0, "warning": 1, "note": 2}
    return sorted(findings, key=lambda f: order[f.severity])


def _stretches(steps: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for step in sorted(steps):
        if out and step == out[-1][1] + 1:
            out[-1] = (out[-1][0], step)
        else:
            out.append((step, step))
    return out


def _steps_text(stretches: Sequence[tuple[int, int]], limit: int = 4) -> str:
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in stretches[:limit]]
    more = f" and {len(stretches) - limit} more" if len(stretches) > limit else ""
    word = "step" if len(stretches) == 1 and stretches[0][0] == stretches[0][1] else "steps"
    return f"{word} {', '.join(parts)}{more}"


def _nonfinite(rank: RankHistory) -> list[Finding]:
    bad = [s.step for s in rank.steps if (s.grad_norm is not None and not math.isfinite(s.grad_norm))
           or any(isinstance(v, float) and not math.isfinite(v) for v in (s.values or {}).values())]
    if not bad:
        return []
    stretches = _stretches(bad)
    origins = [r.text() for r in rank.nonfinite][:3]
    where = ("; " + "; ".join(origins)) if origins else ""
    return [Finding("nonfinite", "problem", _steps_text(stretches),
                    f"non-finite loss or gradient norm at {len(bad)} step(s){where}",
                    "look at the batch and the learning rate at the first of them; in the module named, look for "
                    "log(0), a division by a small number or an fp16 overflow (bf16, or GradScaler); the default "
                    "guard skips those updates (guards.skip.on_nonfinite)")]


def _robust_spikes(series: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """(step, z) of the values over SPIKE_Z robust deviations above the median of the SPIKE_WINDOW before."""
    out = []
    values = [v for _, v in series]
    for i in range(SPIKE_WINDOW, len(series)):
        window = [v for v in values[i - SPIKE_WINDOW:i] if math.isfinite(v)]
        value = values[i]
        if len(window) < SPIKE_WINDOW // 2 or not math.isfinite(value):
            continue
        median = statistics.median(window)
        mad = statistics.median(abs(v - median) for v in window) * 1.4826 or 1e-12
        z = (value - median) / mad
        if z > SPIKE_Z:
            out.append((series[i][0], z))
    return out


def find_spikes(rank: RankHistory) -> dict[str, list[tuple[int, float]]]:
    """(step, z) of the loss and gradient-norm spikes, by quantity ("loss", "gradient norm")."""
    series = {"loss": [(s, v) for s, v in rank.scalar("loss")],
              "gradient norm": [(s.step, s.grad_norm) for s in rank.steps if s.grad_norm is not None]}
    return {name: spikes for name, values in series.items() if (spikes := _robust_spikes(values))}


def _spikes(rank: RankHistory) -> list[Finding]:
    findings = []
    for name, spikes in find_spikes(rank).items():
        stretches = _stretches(step for step, _ in spikes)
        peak_step, peak_z = max(spikes, key=lambda p: p[1])
        lr = _lr_before(rank, peak_step)
        first = stretches[0][0]  # where it started: what moved there is the lead
        evidence = spike_forensics(rank, first, name).lines()
        peak = spike_forensics(rank, peak_step, name)
        if peak_step != first and peak.sampled:  # the highest has its own layer sample: what it says too
            evidence += [f"highest, at step {peak_step}:"] + peak.lines()[1:]
        findings.append(Finding("spike", "warning", _steps_text(stretches),
                                f"{name} spiked {len(stretches)} time(s), highest at step {peak_step} "
                                f"({peak_z:.0f} robust deviations above its recent median{lr})",
                                "a bad batch or a learning rate too high for that phase: warm up longer, clip "
                                "(guards.clip), or let the loss-spike rule cut the LR or rewind", tuple(evidence)))
    return findings


def _lr_before(rank: RankHistory, step: int) -> str:
    """The learning rate at a spike, and a much higher one in the 3 steps before it (the update that caused it)."""
    lrs = {s.step: s.lr[0] for s in rank.steps if s.lr and step - 3 <= s.step <= step}
    if step not in lrs:
        return ""
    before = max(lrs.items(), key=lambda item: item[1])
    if before[1] > 2 * lrs[step]:
        return f", after a learning rate of {before[1]:.3g} at step {before[0]}; {lrs[step]:.3g} at the spike"
    return f", learning rate {lrs[step]:.3g} there"


def _layers(rank: RankHistory) -> list[Finding]:
    samples = [r for r in rank.layers if r.grad_norm and not r.trigger]  # periodic: a spike's sample is its own
    if not samples:
        return []
    findings = []
    order = list(samples[-1].layers)
    norms: dict[str, list[tuple[int, float]]] = {}
    for record in samples:
        for name, norm in zip(record.layers, record.grad_norm, strict=False):
            if norm is not None and math.isfinite(norm):
                norms.setdefault(name, []).append((record.step, norm))
    last = samples[-1]
    dead = [name for name, series in norms.items() if len(series) >= 3 and all(v == 0 for _, v in series[-3:])]
    if dead:
        findings.append(Finding("dead_layer", "warning", f"since step {norms[dead[0]][-3][0]}",
                                f"no gradient reaches {_names(dead)} (a gradient norm of 0 at its last samples)",
                                "frozen on purpose? Otherwise look for a detach() or a no_grad() on its path, or "
                                "ReLUs that never fire (a large negative bias: LeakyReLU, a lower LR)"))
    current = {n: v for n, v in zip(last.layers, last.grad_norm, strict=False) if v is not None and math.isfinite(v)}
    median_now = statistics.median(current.values()) if current else 0.0
    exploding = [name for name, series in norms.items() if len(series) >= 2 and series[0][1] > 0
                 and series[-1][1] > 100 * series[0][1] and series[-1][1] > 10 * median_now > 0]
    if exploding:
        findings.append(Finding("exploding_layer", "problem", f"by step {last.step}",
                                f"the gradient norm of {_names(exploding)} grew over 100x since the first sample, "
                                "and is over 10x the median layer's",
                                "clip (guards.clip), a lower learning rate for it, or normalisation before it"))
    present = [n for n in order if n in current]
    if len(present) >= 3:
        first, final = current[present[0]], current[present[-1]]
        if final > 0 and first < final / 1000:
            findings.append(Finding("vanishing_gradients", "warning", f"at step {last.step}",
                                    f"gradients vanish toward the input: `{present[0]}` gets {first:.2g}, "
                                    f"`{present[-1]}` {final:.2g} (1/{final / max(first, 1e-300):.0f})",
                                    "residual connections, normalisation layers, a better initialisation, or "
                                    "ReLU-like activations instead of saturating ones"))
    ratios: dict[str, list[float]] = {}
    for record in samples:
        for name, ratio in record.update_ratio.items():
            if math.isfinite(ratio):
                ratios.setdefault(name, []).append(ratio)
    high = [n for n, r in ratios.items() if statistics.median(r) > RATIO_HIGH]
    low = [n for n, r in ratios.items() if statistics.median(r) < RATIO_LOW and n not in dead]
    if high:
        findings.append(Finding("update_ratio", "warning", f"steps {samples[0].step}-{last.step}",
                                f"updates of {_names(high)} are over {RATIO_HIGH:g} of their weights per step "
                                "(median; about 1e-3 is usual)", "the learning rate is too high for them: lower it, "
                                "or warm up longer"))
    if low:
        findings.append(Finding("update_ratio", "note", f"steps {samples[0].step}-{last.step}",
                                f"updates of {_names(low)} are under {RATIO_LOW:g} of their weights per step (median)",
                                "they barely learn: a learning rate too low for them, or weight decay holding them"))
    return findings


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more layer(s)" if len(names) > limit else "")


def _second_half(rank: RankHistory) -> list[Any]:
    steps = rank.steps
    return steps[len(steps) // 2:]


def _input_bound(rank: RankHistory) -> list[Finding]:
    late = [s for s in _second_half(rank) if s.dur and s.wait is not None and s.dur > 0]
    if len(late) < 10:
        return []
    fraction = statistics.median(s.wait / s.dur for s in late)
    if fraction < INPUT_BOUND_FRACTION:
        return []
    return [Finding("input_bound", "warning", f"steps {late[0].step}-{late[-1].step}",
                    f"the training waits for data {fraction:.0%} of each step (median data wait "
                    f"{statistics.median(s.wait for s in late) * 1000:.3g} ms of "
                    f"{statistics.median(s.dur for s in late) * 1000:.3g} ms)",
                    "more DataLoader workers (num_workers), pin_memory=True, persistent_workers, prefetching, or "
                    "data that is cheaper to load (pre-tokenised, decoded once)")]


def _plateau(rank: RankHistory) -> list[Finding]:
    name = "val_loss" if len(rank.scalar("val_loss")) >= 5 else "loss"
    series = [(s, v) for s, v in rank.scalar(name) if math.isfinite(v)]
    steps = [s for s, _ in series]
    if len(series) < 10 or (steps[-1] - steps[0]) < PLATEAU_MIN_STEPS:
        return []
    cut = steps[0] + (1 - PLATEAU_FRACTION) * (steps[-1] - steps[0])
    before = [v for s, v in series if s <= cut]
    after = [v for s, v in series if s > cut]
    if not before or not after:
        return []
    smooth = min(_smoothed(after))
    best_before = min(_smoothed(before))
    if smooth < best_before * (1 - PLATEAU_IMPROVEMENT):
        return []
    return [Finding("plateau", "note", f"steps {int(cut)}-{steps[-1]}",
                    f"{name} has not improved by {PLATEAU_IMPROVEMENT:.0%} over the last {PLATEAU_FRACTION:.0%} of the "
                    f"run (best {best_before:.4g} before step {int(cut)}, {smooth:.4g} since)",
                    "a lower learning rate (ReduceLROnPlateau, or the val-loss-plateau rule acting), or stop: the run "
                    "may have converged")]


def _smoothed(values: Sequence[float], window: int = 5) -> list[float]:
    """Running means of ``window`` values: a plateau is judged on the trend, not on one lucky batch."""
    if len(values) <= window:
        return [statistics.fmean(values)]
    return [statistics.fmean(values[i:i + window]) for i in range(len(values) - window + 1)]


def _clipping(rank: RankHistory) -> list[Finding]:
    late = [s for s in _second_half(rank) if s.clip is not None and not s.skip]
    if len(late) < 10:
        return []
    fraction = sum(bool(s.clipped) for s in late) / len(late)
    if fraction < CLIPPED_FRACTION:
        return []
    return [Finding("clipping", "warning", f"steps {late[0].step}-{late[-1].step}",
                    f"the clip threshold {late[-1].clip:.3g} clipped {fraction:.0%} of the steps: every update is "
                    "rescaled, so the threshold is the step size",
                    "raise max_norm above the usual gradient norm (see `gradwatch report`), or an adaptive scheme "
                    "(guards.clip.scheme: autoclip or zclip)")]
