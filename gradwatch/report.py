"""``gradwatch report``: a run's history as pictures, from the spool alone (no Prometheus, no Grafana).

One figure, its panels sharing the step axis: the loss and logged scalars; the gradient norm against the clip
threshold; the learning rate of each param group; step time and data wait, with throughput (samples/s when the
batch size is logged, else steps/s); CUDA memory, when recorded; and a
heat map of the per-layer gradient norms. Actions, the agent's decisions, skipped steps, rewinds, where a
non-finite value came from and spikes (with what moved first: gradwatch.forensics) are marked on every panel at
their step, and listed. ``-o FILE.png`` writes the
figure (for a chat message), ``-o FILE.html`` one self-contained page that opens offline: the figure inline
(SVG), the run's metadata and the list of what happened, step by step. Rank 0 is drawn; ``--rank`` picks another.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradwatch.errors import GradwatchError, MissingExtraError
from gradwatch.history import RankHistory, RunHistory

MARK_COLORS = {"action": "#d62728", "decision": "#9467bd", "skip": "#ff7f0e", "nonfinite": "#000000",
               "resume": "#2ca02c", "spike": "#8c564b"}
MAX_SPIKE_MARKS = 10  # the first spikes of each quantity: what moved there is the lead


@dataclass(frozen=True)
class Mark:
    """Something that happened at a step, drawn as a vertical line and listed."""

    step: int
    kind: str  # action, decision, skip, nonfinite, resume, spike
    text: str
    to_step: int | None = None  # a stretch of consecutive skipped updates ends here


def marks(run: RunHistory, rank: RankHistory) -> list[Mark]:
    out = [Mark(a.step, "action", f"{a.action} {a.status.value}: {a.detail}".strip()) for a in rank.actions]
    out += [Mark(int(d["step"]), "decision", f"rule {d.get('rule')}: {d.get('reason')} -> "
                 f"{(d.get('action') or {}).get('type', '?') if isinstance(d.get('action'), dict) else d.get('action')}"
                 f" ({d.get('mode')})") for d in run.decisions if isinstance(d.get("step"), int)]
    out += _skip_stretches(rank)
    out += [Mark(n.step, "nonfinite", n.text()) for n in rank.nonfinite]
    out += [Mark(r.step, "resume", f"resumed after step {r.step}") for r in rank.resumes]
    out += _spike_marks(rank)
    return sorted(out, key=lambda m: (m.step, m.kind))


def _spike_marks(rank: RankHistory) -> list[Mark]:
    """The start of each spike stretch, with its forensics (gradwatch.forensics): LR, batch, what moved first."""
    from gradwatch.diagnosis import find_spikes
    from gradwatch.forensics import spike_forensics

    out = []
    for quantity, spikes in find_spikes(rank).items():
        starts = [step for i, (step, _) in enumerate(spikes) if i == 0 or spikes[i - 1][0] != step - 1]
        out += [Mark(step, "spike", f"{quantity} spike; " + "; ".join(spike_forensics(rank, step, quantity).lines()))
                for step in starts[:MAX_SPIKE_MARKS]]
    return out


def _skip_stretches(rank: RankHistory) -> list[Mark]:
    """Skipped updates, consecutive ones of one reason as one stretch (a rewind skips twenty in a row)."""
    out: list[Mark] = []
    for s in rank.steps:
        if not s.skip:
            continue
        last = out[-1] if out else None
        if last is not None and last.text == f"update skipped ({s.skip})" and (last.to_step or last.step) == s.step - 1:
            out[-1] = Mark(last.step, "skip", last.text, s.step)
        else:
            out.append(Mark(s.step, "skip", f"update skipped ({s.skip})"))
    return [Mark(m.step, m.kind, m.text + (f", steps {m.step}-{m.to_step}" if m.to_step else ""), m.to_step)
            for m in out]


def _throughput(steps: Sequence[Any]) -> tuple[list[float], str]:
    """Samples (or steps) per second at each step, a running mean over 1/50 of the run: readable, not jumpy."""
    batch = any((s.values or {}).get("batch_size") for s in steps)
    per_step = [math.nan if not s.dur or s.dur <= 0 else
                ((s.values or {}).get("batch_size", math.nan) if batch else 1.0) / s.dur for s in steps]
    window = max(1, len(per_step) // 50)
    out = []
    for i in range(len(per_step)):
        chunk = [v for v in per_step[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out, "samples/s" if batch else "steps/s"


def _finite(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None or not math.isfinite(v) else v for v in values]


def figure(run: RunHistory, rank_number: int = 0) -> Any:
    """The matplotlib Figure of one rank (MissingExtraError without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtraError("gradwatch report needs matplotlib: pip install 'gradwatch[report]'") from None
    rank = run.rank(rank_number)
    steps = rank.steps
    if not steps:
        raise GradwatchError(f"run {run.name!r} rank {rank_number} has no steps recorded yet; nothing to plot")
    x = [s.step for s in steps]
    layers = rank.layers
    memory = [(s.step, s.cuda_mem.allocated) for s in steps if s.cuda_mem is not None and s.cuda_mem.allocated]
    panels = ["loss", "grad", "lr", "time"] + (["memory"] if memory else []) + (["layers"] if layers else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.3 * len(panels) + 0.6), sharex=True,
                             squeeze=False, layout="constrained")
    ax = {name: axes[i][0] for i, name in enumerate(panels)}
    fig.suptitle(f"gradwatch run {run.name} (rank {rank_number}, {run.status}, {len(steps)} steps)", fontsize=12)

    loss_ax = ax["loss"]
    for name in rank.scalar_names:
        if name == "batch_size":
            continue
        series = rank.scalar(name)
        if series:
            loss_ax.plot([s for s, _ in series], _finite([v for _, v in series]), label=name,
                         lw=1.4 if name == "loss" else 1.0, marker="o" if len(series) < 40 and name != "loss" else None,
                         ms=3)
    loss_ax.set_ylabel("logged")
    _log_if_wide(loss_ax)
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(loc="upper right", fontsize=8)

    grad_ax = ax["grad"]
    grad_ax.plot(x, _finite([s.grad_norm for s in steps]), lw=1.0, color="#1f77b4", label="gradient norm")
    clips = [(s.step, s.clip) for s in steps if s.clip is not None]
    if clips:
        grad_ax.plot([s for s, _ in clips], [c for _, c in clips], lw=1.0, ls="--", color="#d62728",
                     label="clip threshold")
    bad = [s.step for s in steps if s.grad_norm is not None and not math.isfinite(s.grad_norm)]
    if bad:
        grad_ax.plot(bad, [0] * len(bad), "x", color="black", transform=grad_ax.get_xaxis_transform(), clip_on=False,
                     label="non-finite")
    grad_ax.set_ylabel("grad norm")
    _log_if_wide(grad_ax)
    grad_ax.legend(loc="upper right", fontsize=8)

    lr_ax = ax["lr"]
    groups = max((len(s.lr) for s in steps), default=0)
    for group in range(groups):
        lr_ax.plot(x, [s.lr[group] if group < len(s.lr) else math.nan for s in steps], lw=1.0, label=f"group {group}")
    lr_ax.set_ylabel("learning rate")
    _log_if_wide(lr_ax)
    if groups > 1:
        lr_ax.legend(loc="upper right", fontsize=8)

    time_ax = ax["time"]
    time_ax.plot(x, [math.nan if s.dur is None else s.dur * 1000 for s in steps], lw=0.8, label="step time")
    time_ax.plot(x, [math.nan if s.wait is None else s.wait * 1000 for s in steps], lw=0.8, label="data wait")
    time_ax.set_ylabel("ms")
    rate_ax = time_ax.twinx()  # throughput on the right: samples/s when the batch size is logged, else steps/s
    rate, rate_name = _throughput(steps)
    rate_ax.plot(x, rate, lw=1.0, color="#2ca02c", label=rate_name)
    rate_ax.set_ylabel(rate_name)
    rate_ax.set_ylim(bottom=0)
    handles = [*time_ax.get_legend_handles_labels()[0], *rate_ax.get_legend_handles_labels()[0]]
    time_ax.legend(handles=handles, loc="upper left", fontsize=8)

    if memory:
        mem_ax = ax["memory"]
        mem_ax.plot([s for s, _ in memory], [m / 2**30 for _, m in memory], lw=1.0, label="allocated")
        mem_ax.set_ylabel("CUDA GiB")

    if layers:
        _heat_map(fig, ax["layers"], layers)

    happened = marks(run, rank)
    for mark in happened:
        for axis in ax.values():
            color = MARK_COLORS.get(mark.kind, "grey")
            if mark.to_step is not None:
                axis.axvspan(mark.step - 0.5, mark.to_step + 0.5, color=color, alpha=0.18, lw=0, gid=f"mark-{mark.kind}")
            else:
                axis.axvline(mark.step, color=color, lw=0.8, alpha=0.6, ls=":" if mark.kind == "decision" else "-",
                             gid=f"mark-{mark.kind}")
    ax[panels[-1]].set_xlim(x[0] - 0.5, x[-1] + 0.5)  # the steps, whatever the heat map's cells
    kinds = [k for k in MARK_COLORS if any(m.kind == k for m in happened)]
    if kinds:  # what the vertical lines are, once, above the panels
        from matplotlib.lines import Line2D

        fig.legend([Line2D([], [], color=MARK_COLORS[k], ls=":" if k == "decision" else "-") for k in kinds],
                   [_MARK_NAMES[k] for k in kinds], loc="outside lower center", ncols=len(kinds), fontsize=8,
                   frameon=False)
    ax[panels[-1]].set_xlabel("step")
    return fig


_MARK_NAMES = {"action": "action applied", "decision": "rule fired", "skip": "update skipped",
               "nonfinite": "non-finite origin", "resume": "resumed", "spike": "spike"}


def _log_if_wide(axis: Any) -> None:
    """A log scale where the values span orders of magnitude (a spike, a decaying LR), linear otherwise."""
    values = [v for line in axis.get_lines() for v in line.get_ydata() if isinstance(v, float) and math.isfinite(v)]
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
        axis.set_yscale("log")


def _heat_map(fig: Any, axis: Any, layers: Sequence[Any]) -> None:
    names: list[str] = []
    for record in layers:
        for name in record.layers:
            if name not in names:
                names.append(name)
    shown = names[:60]  # a readable number of rows; the export has them all
    grid = [[math.nan] * len(layers) for _ in shown]
    for col, record in enumerate(layers):
        for name, norm in zip(record.layers, record.grad_norm, strict=False):
            if name in shown and norm is not None and math.isfinite(norm) and norm > 0:
                grid[shown.index(name)][col] = math.log10(norm)
    first, last = layers[0].step, layers[-1].step
    half = (last - first) / max(1, len(layers) - 1) / 2 if len(layers) > 1 else 0.5
    image = axis.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                        extent=(first - half, last + half, len(shown) - 0.5, -0.5))
    axis.set_yticks(range(len(shown)), [n if len(n) <= 28 else "…" + n[-27:] for n in shown], fontsize=7)
    axis.set_ylabel("layer")
    fig.colorbar(image, ax=axis, label="log10 grad norm", pad=0.01)


def comparison(runs: Sequence[RunHistory], rank_number: int = 0) -> Any:
    """Key curves of several runs on one step axis (``gradwatch compare``): loss, validation loss when logged,
    gradient norm, learning rate, step time; one colour per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtraError("gradwatch compare needs matplotlib: pip install 'gradwatch[report]'") from None
    ranks = [(run, run.rank(rank_number)) for run in runs]
    has_val = any(rank.scalar("val_loss") for _, rank in ranks)
    panels = ["loss"] + (["val_loss"] if has_val else []) + ["grad norm", "learning rate", "step time (ms)"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.2 * len(panels) + 0.8), sharex=True, squeeze=False,
                             layout="constrained")
    fig.suptitle(f"gradwatch: {len(runs)} runs compared (rank {rank_number})", fontsize=12)
    for run, rank in ranks:
        steps = rank.steps
        curves = {"loss": rank.scalar("loss"), "val_loss": rank.scalar("val_loss"),
                  "grad norm": [(s.step, s.grad_norm) for s in steps if s.grad_norm is not None],
                  "learning rate": [(s.step, s.lr[0]) for s in steps if s.lr],
                  "step time (ms)": [(s.step, s.dur * 1000) for s in steps if s.dur is not None]}
        for i, panel in enumerate(panels):
            series = curves[panel]
            if series:
                axes[i][0].plot([a for a, _ in series], _finite([b for _, b in series]), lw=1.0, label=run.name,
                                marker="o" if panel == "val_loss" else None, ms=3)
    for i, panel in enumerate(panels):
        axes[i][0].set_ylabel(panel)
        _log_if_wide(axes[i][0])
    axes[0][0].legend(loc="upper right", fontsize=8)
    axes[-1][0].set_xlabel("step")
    return fig


def write_comparison(runs: Sequence[RunHistory], output: Path, rank: int = 0) -> Path:
    return _save(comparison(runs, rank), output, lambda fig: _comparison_page(runs, fig))


def write(run: RunHistory, output: Path, rank: int = 0) -> Path:
    """Write ``output``: a PNG (``.png``) or a self-contained HTML page (``.html``)."""
    _check_suffix(output)
    return _save(figure(run, rank), output, lambda fig: _page(run, run.rank(rank), fig))


def _check_suffix(output: Path) -> None:
    if output.suffix.lower() not in (".png", ".html", ".htm"):
        raise GradwatchError(f"-o {output}: give a file ending in .html or .png")


def _save(fig: Any, output: Path, page: Any) -> Path:
    _check_suffix(output)
    suffix = output.suffix.lower()
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        fig.savefig(output, dpi=110)
    else:
        output.write_text(page(fig), encoding="utf-8")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return output


def _comparison_page(runs: Sequence[RunHistory], fig: Any) -> str:
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    rows = "".join(
        f"<tr><td>{html.escape(run.name)}</td><td>{html.escape(run.status)}</td>"
        f'<td class="n">{len(r.steps)}</td><td class="n">{_last(r.scalar("loss"))}</td>'
        f'<td class="n">{_last(r.scalar("val_loss"))}</td><td>{html.escape(" ".join(r.meta.argv))}</td></tr>'
        for run in runs for r in [run.rank(0)])
    names = ", ".join(html.escape(run.name) for run in runs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradwatch: {names}</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}th,td{{text-align:left;padding:.2em .8em;border-bottom:1px solid #ddd}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}}svg{{max-width:100%;height:auto}}</style></head><body>
<h1>gradwatch: {len(runs)} runs compared</h1>
<table><tr><th>run</th><th>status</th><th>steps</th><th>last loss</th><th>last val_loss</th><th>command</th></tr>{rows}</table>
{svg.getvalue()[svg.getvalue().index("<svg"):]}
<p>Made by <code>gradwatch compare</code> from the runs' spool.</p></body></html>
"""


def _last(series: Sequence[tuple[int, float]]) -> str:
    return f"{series[-1][1]:.4g}" if series else "-"


def _page(run: RunHistory, rank: RankHistory, fig: Any) -> str:
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=60)
    meta = rank.meta
    facts = [("run", run.name), ("status", run.status), ("rank", f"{rank.rank} of {meta.world_size}"),
             ("steps", str(rank.steps[-1].step if rank.steps else 0)), ("host", meta.host), ("command", " ".join(meta.argv)),
             ("torch", meta.torch), ("gradwatch", meta.gradwatch)]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts if v)
    events = "".join(f'<tr><td class="n">{m.step}</td><td><span class="dot" style="background:'
                     f'{MARK_COLORS.get(m.kind, "grey")}"></span>{html.escape(m.kind)}</td><td>{html.escape(m.text)}</td></tr>'
                     for m in marks(run, rank)) or \
        '<tr><td colspan="3">nothing: no action, decision, skip or non-finite step</td></tr>'
    icon = base64.b64encode(png.getvalue()).decode()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradwatch: {html.escape(run.name)}</title>
<link rel="icon" href="data:image/png;base64,{icon}">
<style>body{{font:14px system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}th,td{{text-align:left;padding:.2em .8em;border-bottom:1px solid #ddd;
vertical-align:top}}td.n{{text-align:right;font-variant-numeric:tabular-nums}}.dot{{display:inline-block;width:.7em;
height:.7em;border-radius:50%;margin-right:.4em}}svg{{max-width:100%;height:auto}}</style></head><body>
<h1>gradwatch run {html.escape(run.name)}</h1><table>{rows}</table>
{svg.getvalue()[svg.getvalue().index("<svg"):]}
<h2>What happened, step by step</h2><table><tr><th>step</th><th>what</th><th>detail</th></tr>{events}</table>
<p>Made by <code>gradwatch report</code> from the run's spool; the numbers: <code>gradwatch export {html.escape(run.name)}</code>.</p>
</body></html>
"""
