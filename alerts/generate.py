"""Generate the Prometheus alerting rules, their ``promtool test rules`` unit tests and the table
in docs/alerts.md from one place: the thresholds and alert definitions below.

    python alerts/generate.py          # write alerts/gradwatch.rules.yml, alerts/tests/, docs/alerts.md's parts
    python alerts/generate.py --check  # exit 1 if any of them is out of date (CI runs this)
    python alerts/generate.py --docs-url https://docs.example.com/gradwatch \
        --grafana-url https://grafana.example.com -o site.rules.yml   # the rules with your site's links

Every alert carries a ``runbook_url`` (its section of docs/alerts.md, generated here too) and a
``dashboard_url`` (the run's Run dashboard; the Fleet for an alert about an agent), built by
gradwatch/agent/links.py as the agent's own alerts are.

Each alert's summary and description are written once, with ``{label}`` placeholders. They become
Go templates for Prometheus (``{{ $labels.run }}``), and are rendered in Python for the expected
annotations of the unit tests: a template that names a missing label fails ``promtool test rules``.
Every alert has a series that must fire it and one that must not.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradwatch.agent.links import AlertLinks, alert_name
from gradwatch.rules.catalogue_specs import CATALOGUE_SPECS, catalogue_types
from gradwatch.rules.config import default_rules

ROOT = Path(__file__).resolve().parent.parent
RULES_FILE = ROOT / "alerts" / "gradwatch.rules.yml"
TESTS_FILE = ROOT / "alerts" / "tests" / "gradwatch.rules.test.yml"
DOC_FILE = ROOT / "docs" / "alerts.md"
DOC_START, DOC_END = "<!-- prometheus-alerts:start -->", "<!-- prometheus-alerts:end -->"
RUNBOOK_START, RUNBOOK_END = "<!-- runbooks:start -->", "<!-- runbooks:end -->"

# -- thresholds: the one place to tune them ---------------------------------------------------------
AGENT_JOB = "gradwatch"  # the scrape job of the agents (docker-compose and docs/alerts.md use it)
WINDOW = "5m"  # how far back a counter increase counts (spikes, non-finite values)
DIVERGENCE_FACTOR = 3  # 5-minute average loss over this many times the best 5-minute average of the hour
STALL_SECONDS = 600  # no optimizer step for this long while the run is running
THROUGHPUT_RATIO = 0.5  # steps/s of the last 5 minutes below this fraction of the 30 minutes before
GPU_UTIL_PERCENT = 30  # average GPU utilisation over 10 minutes below this, while a run is active on the host
GPU_MEMORY_RATIO = 0.95  # GPU memory used over this fraction, while a run is active on the host

_HOST = 'host'  # placeholder: the run's host, looked up in gradwatch_run_info
_RUN_LABELS = {"job": AGENT_JOB, "instance": "trainer-1:9478", "run": "resnet-lr3e-4", "rank": "0"}
_INFO = ("gradwatch_run_info", {**_RUN_LABELS, "host": "trainer-1", "pid": "4242", "local_rank": "0",
                                "world_size": "1", "torch_version": "2.13.0", "gradwatch_version": "0.1.0"})
_HOST_VALUE = "trainer-1"
_RUN = {k: _RUN_LABELS[k] for k in ("job", "instance", "run", "rank")}


@dataclass
class Case:
    series: list[tuple[str, dict[str, str], str]]  # (metric, labels, promtool values notation)
    eval_time: str
    labels: dict[str, str] | None = None  # the fired alert's labels besides alertname/severity/source (default: _RUN)
    values: dict[str, Any] = field(default_factory=dict)  # what the templates render for {value...}, {runs}


@dataclass
class PromAlert:
    name: str
    severity: str
    expr: str
    for_: str
    summary: str
    description: str
    hint: str
    meaning: str  # for docs/alerts.md
    threshold: str  # for docs/alerts.md
    fires: Case
    quiet: Case


def _running(values: str = "1+0x40") -> tuple[str, dict[str, str], str]:
    return ("gradwatch_run_state", {**_RUN_LABELS, "state": "running"}, values)


def _state(state: str, values: str) -> tuple[str, dict[str, str], str]:
    return ("gradwatch_run_state", {**_RUN_LABELS, "state": state}, values)


def _counter(name: str, quantity: str, values: str) -> tuple[str, dict[str, str], str]:
    return (name, {**_RUN_LABELS, "quantity": quantity}, values)


_GPU = {"job": AGENT_JOB, "instance": "trainer-1:9478", "gpu": "0", "uuid": "GPU-1c2d", "host": "trainer-1",
        "run": "resnet-lr3e-4", "rank": "0"}

#: Recording rules the alerts read: evaluated once per interval, instead of a subquery per alert evaluation.
LOSS_AVG_5M = "gradwatch:loss:avg_over_time_5m"
RECORDING_RULES = [{"record": LOSS_AVG_5M, "expr": "avg_over_time(gradwatch_loss[5m])"}]

ALERTS: list[PromAlert] = [
    PromAlert(
        name="GradwatchNonfiniteLoss", severity="critical",
        expr=f'increase(gradwatch_nonfinite_total{{quantity="loss"}}[{WINDOW}]) > 0', for_="0m",
        summary="Run {run} rank {rank} logged a NaN or infinite loss",
        description="The loss of run {run} (rank {rank}, host {host}) was not finite in the last " + WINDOW + ".",
        hint="Check the batch and the learning rate at that step; gradwatch status shows whether updates were "
             "skipped.",
        meaning="The loss was NaN or infinite at least once (counted at every step, so a single bad step between "
                "two scrapes fires it).",
        threshold=f"any in {WINDOW}",
        fires=Case([_counter("gradwatch_nonfinite_total", "loss", "0 0 0 1 1 1"), _INFO + ("1x10",)], "5m",
                   {**_RUN_LABELS, "quantity": "loss"}),
        quiet=Case([_counter("gradwatch_nonfinite_total", "loss", "0x10"), _INFO + ("1x10",)], "5m"),
    ),
    PromAlert(
        name="GradwatchLossSpike", severity="warning",
        expr=f'increase(gradwatch_spikes_total{{quantity="loss"}}[{WINDOW}]) > 0', for_="0m",
        summary="Run {run} rank {rank}: loss spike",
        description="The loss of run {run} (rank {rank}, host {host}) jumped more than 6 standard deviations above "
                    "its moving average in the last " + WINDOW + ".",
        hint="A bad batch or a learning rate too high for this phase; see the rules' actions in gradwatch status.",
        meaning="A step's loss was a z-score over 6 above its outlier-free moving average (detected by the agent at "
                "every step).",
        threshold=f"any in {WINDOW}",
        fires=Case([_counter("gradwatch_spikes_total", "loss", "0 0 2 2 2 2"), _INFO + ("1x10",)], "4m",
                   {**_RUN_LABELS, "quantity": "loss"}),
        quiet=Case([_counter("gradwatch_spikes_total", "loss", "2x10"), _INFO + ("1x10",)], "8m"),
    ),
    PromAlert(
        name="GradwatchGradNormExplosion", severity="warning",
        expr=(f'increase(gradwatch_spikes_total{{quantity="grad_norm"}}[{WINDOW}]) > 0 '
              f'or increase(gradwatch_nonfinite_total{{quantity="grad_norm"}}[{WINDOW}]) > 0'), for_="0m",
        summary="Run {run} rank {rank}: gradient norm exploding",
        description="The gradient norm of run {run} (rank {rank}, host {host}) spiked or was not finite in the last "
                    + WINDOW + ".",
        hint="Enable clipping (guards.clip: zclip) or lower the learning rate; check for a bad batch.",
        meaning="The global gradient norm spiked (z-score over 6) or was NaN/infinite.",
        threshold=f"any in {WINDOW}",
        fires=Case([_counter("gradwatch_spikes_total", "grad_norm", "0 0 0"),
                    _counter("gradwatch_nonfinite_total", "grad_norm", "0 3 3"), _INFO + ("1x10",)], "2m",
                   {**_RUN_LABELS, "quantity": "grad_norm"}),
        quiet=Case([_counter("gradwatch_spikes_total", "grad_norm", "0x10"),
                    _counter("gradwatch_nonfinite_total", "grad_norm", "0x10"), _INFO + ("1x10",)], "5m"),
    ),
    PromAlert(
        name="GradwatchLossDivergence", severity="critical",
        expr=(f"{LOSS_AVG_5M} > {DIVERGENCE_FACTOR} * min_over_time({LOSS_AVG_5M}[1h]) "
              f"and min_over_time({LOSS_AVG_5M}[1h]) > 0"), for_="5m",
        summary="Run {run} rank {rank} is diverging",
        description="The 5-minute average loss of run {run} (rank {rank}, host {host}) is {value:.3g}, over "
                    f"{DIVERGENCE_FACTOR} times its best 5-minute average of the last hour.",
        hint="Lower the learning rate or warm up longer, and resume from a checkpoint taken before the rise.",
        meaning="The loss has risen well above the best it reached, for 5 minutes: training is no longer converging.",
        threshold=f"{DIVERGENCE_FACTOR}x the best 5-minute average of the hour, for 5m",
        fires=Case([("gradwatch_loss", _RUN_LABELS, "1 0.8 0.6 0.5 0.5 0.5 0.5 0.5 0.5 0.5 4+0x20"),
                    _INFO + ("1x40",)], "25m", None, {"value": 4.0}),
        quiet=Case([("gradwatch_loss", _RUN_LABELS, "1 0.8 0.6 0.5 0.5 0.5 0.5 0.5 0.5 0.5 0.9+0x20"),
                    _INFO + ("1x40",)], "25m"),
    ),
    PromAlert(
        name="GradwatchRunStalled", severity="warning",
        expr=(f'max without (state) (gradwatch_run_state{{state="stalled"}} == 1) '
              f'or (time() - gradwatch_last_step_timestamp_seconds > {STALL_SECONDS} '
              f'and on (job, instance, run, rank) gradwatch_run_state{{state="running"}} == 1)'), for_="1m",
        summary="Run {run} rank {rank} is stalled",
        description=f"Run {{run}} (rank {{rank}}, host {{host}}) has made no optimizer step for over {STALL_SECONDS}"
                    " s, or sent nothing at all for the agent's stall_after_seconds, and has not finished.",
        hint="A hung data loader, a deadlocked collective (did another rank die?) or a stuck filesystem; "
             "py-spy dump --pid shows where it waits.",
        meaning="No optimizer step for a while, and the process neither finished nor crashed.",
        threshold=f"no step for {STALL_SECONDS} s (or agent state stalled: no record for 120 s), for 1m",
        fires=Case([_running("1+0x20"), ("gradwatch_last_step_timestamp_seconds", _RUN_LABELS, "0+60x3 180+0x16"),
                    _INFO + ("1x20",)], "15m"),
        quiet=Case([_running("1+0x20"), ("gradwatch_last_step_timestamp_seconds", _RUN_LABELS, "0+60x20"),
                    _INFO + ("1x20",)], "15m"),
    ),
    PromAlert(
        name="GradwatchRunCrashed", severity="critical",
        expr='max without (state) (gradwatch_run_state{state="crashed"} == 1)', for_="0m",
        summary="Run {run} rank {rank} crashed",
        description="The training process of run {run} (rank {rank}, host {host}) ended without finishing "
                    "(an exception, a signal or the OOM killer).",
        hint="Read the last lines of the training log (and dmesg for the OOM killer); resume from the last "
             "checkpoint.",
        meaning="The process exited without closing its probe, or closed it with an exception.",
        threshold="immediately",
        fires=Case([_state("crashed", "0 0 1 1"), _INFO + ("1x10",)], "3m"),
        quiet=Case([_state("crashed", "0x10"), _state("interrupted", "0 0 1 1"), _INFO + ("1x10",)], "3m"),
    ),
    PromAlert(
        name="GradwatchRunFailed", severity="warning",
        expr='max without (state) (gradwatch_run_state{state="failed"} == 1)', for_="0m",
        summary="Run {run} rank {rank} failed",
        description="The training script of run {run} (rank {rank}, host {host}) exited with a non-zero status "
                    "(sys.exit(n)).",
        hint="The script gave up on purpose: its last log lines say why.",
        meaning="The script exited with a non-zero status.",
        threshold="immediately",
        fires=Case([_state("failed", "0 0 1 1"), _INFO + ("1x10",)], "3m"),
        quiet=Case([_state("failed", "0x10"), _state("finished", "0 0 1 1"), _INFO + ("1x10",)], "3m"),
    ),
    PromAlert(
        name="GradwatchThroughputDropped", severity="warning",
        expr=(f"rate(gradwatch_steps_total[5m]) < {THROUGHPUT_RATIO} * rate(gradwatch_steps_total[30m] offset 5m) "
              f'and on (job, instance, run, rank) gradwatch_run_state{{state="running"}} == 1'), for_="10m",
        summary="Run {run} rank {rank}: throughput dropped to {value:.3g} steps/s",
        description=f"Run {{run}} (rank {{rank}}, host {{host}}) runs at under {THROUGHPUT_RATIO:.0%} of the "
                    "steps per second of the 30 minutes before.",
        hint="Compare data wait and step time on the run dashboard: a slow data loader, a throttled GPU, "
             "or another job on the same GPUs.",
        meaning="Steps per second fell by more than half, for 10 minutes, while the run is running.",
        threshold=f"below {THROUGHPUT_RATIO:.0%} of the previous 30 minutes, for 10m",
        fires=Case([("gradwatch_steps_total", _RUN_LABELS, "0+600x40 24000+60x30"), _running("1+0x70"),
                    _INFO + ("1x70",)], "60m", None, {"value": 1.0}),
        quiet=Case([("gradwatch_steps_total", _RUN_LABELS, "0+600x70"), _running("1+0x70"), _INFO + ("1x70",)],
                   "60m"),
    ),
    PromAlert(
        name="GradwatchGPUUnderutilised", severity="warning",
        expr=f'100 * avg_over_time(gradwatch_gpu_utilization_ratio{{run!=""}}[10m]) < {GPU_UTIL_PERCENT}',
        for_="15m",
        summary="GPU {gpu} on {host_label} is {value:.0f}% busy while run {run} rank {rank} uses it",
        description="GPU {gpu} ({uuid}) on host {host_label} averaged under " + str(GPU_UTIL_PERCENT) +
                    "% utilisation for 15 minutes while run {run} rank {rank} used it.",
        hint="The run is input-bound (check data wait) or waits on something else (a collective, the CPU).",
        meaning="A GPU a run uses was mostly idle (gradwatch's own NVML series, labelled with the run by its GPU's "
                "UUID: no join with the DCGM exporter's host names).",
        threshold=f"under {GPU_UTIL_PERCENT}% on average over 10 minutes, for 15m",
        fires=Case([("gradwatch_gpu_utilization_ratio", _GPU, "0.1+0x40")], "30m", _GPU, {"value": 10.0}),
        quiet=Case([("gradwatch_gpu_utilization_ratio", _GPU, "0.95+0x40"),
                    ("gradwatch_gpu_utilization_ratio", {**_GPU, "gpu": "1", "run": "", "rank": ""}, "0+0x40")],
                   "30m"),
    ),
    PromAlert(
        name="GradwatchGPUMemoryNearFull", severity="warning",
        expr=(f'100 * gradwatch_gpu_memory_used_bytes{{run!=""}} / gradwatch_gpu_memory_total_bytes{{run!=""}} > '
              f"{GPU_MEMORY_RATIO * 100:g}"), for_="5m",
        summary="GPU {gpu} on {host_label} is {value:.0f}% full (run {run} rank {rank})",
        description="GPU {gpu} ({uuid}) on host {host_label} has over " + f"{GPU_MEMORY_RATIO:.0%}" +
                    " of its memory in use while run {run} rank {rank} uses it.",
        hint="The next larger batch or sequence will hit out-of-memory: lower the batch size, enable activation "
             "checkpointing, or check for a leak (memory that grows every step).",
        meaning="GPU memory in use over the threshold on a GPU a run uses (gradwatch_gpu_memory_used_bytes over "
                "_total_bytes, all processes on the GPU).",
        threshold=f"over {GPU_MEMORY_RATIO:.0%} used, for 5m",
        fires=Case([("gradwatch_gpu_memory_used_bytes", _GPU, "79000+0x20"),
                    ("gradwatch_gpu_memory_total_bytes", _GPU, "80000+0x20")], "10m", _GPU, {"value": 98.75}),
        quiet=Case([("gradwatch_gpu_memory_used_bytes", _GPU, "40000+0x20"),
                    ("gradwatch_gpu_memory_total_bytes", _GPU, "80000+0x20")], "10m"),
    ),
    PromAlert(
        name="GradwatchAgentDown", severity="critical",
        expr=f'up{{job="{AGENT_JOB}"}} == 0', for_="2m",
        summary="gradwatch agent {instance} is down",
        description="Prometheus cannot scrape the gradwatch agent at {instance}: the runs on that host are neither "
                    "exported nor watched by rules. Probes keep spooling; nothing is lost while it is down.",
        hint="systemctl status gradwatch-agent (or docker compose ps); gradwatch agent prints why it cannot start.",
        meaning=f"Prometheus' scrape of the agent (job {AGENT_JOB}) fails.",
        threshold="for 2m",
        fires=Case([("up", {"job": AGENT_JOB, "instance": "trainer-1:9478"}, "1 1 0x10")], "6m",
                   {"job": AGENT_JOB, "instance": "trainer-1:9478"}),
        quiet=Case([("up", {"job": AGENT_JOB, "instance": "trainer-1:9478"}, "1x10")], "6m"),
    ),
    PromAlert(
        name="GradwatchProbeDroppingRecords", severity="warning",
        expr=f"increase(gradwatch_probe_dropped_records_total[{WINDOW}]) > 0", for_="0m",
        summary="Run {run} rank {rank}: the probe is dropping records",
        description="The probe in run {run} (rank {rank}, host {host}) could not spool some records (queue full or "
                    "spool unwritable); training goes on, the agent misses those steps.",
        hint="Check free space and permissions of GRADWATCH_HOME on that host.",
        meaning="The probe dropped records rather than slow training down.",
        threshold=f"any in {WINDOW}",
        fires=Case([("gradwatch_probe_dropped_records_total", _RUN_LABELS, "0 0 5 9"), _INFO + ("1x10",)], "3m"),
        quiet=Case([("gradwatch_probe_dropped_records_total", _RUN_LABELS, "0x10"), _INFO + ("1x10",)], "5m"),
    ),
    PromAlert(
        name="GradwatchAlertDeliveryFailing", severity="warning",
        expr=(f'increase(gradwatch_agent_notifications_total{{result=~"expired|dropped"}}[{WINDOW}]) > 0 '
              f'or gradwatch_agent_notifications_pending > 100'), for_="5m",
        summary="gradwatch agent {instance} cannot deliver to {endpoint}",
        description="The agent at {instance} gave up on notifications to {endpoint} or has a backlog: "
                    "step-resolution alerts or annotations are late or lost.",
        hint="Check that the endpoint is up and reachable from the agent (gradwatch agent logs the error).",
        meaning="The agent's deliveries to Alertmanager, the webhook or Grafana keep failing.",
        threshold=f"any given up in {WINDOW}, or over 100 waiting, for 5m",
        fires=Case([("gradwatch_agent_notifications_pending", {"job": AGENT_JOB, "instance": "trainer-1:9478",
                                                               "endpoint": "alertmanager"}, "150+0x12")], "10m",
                   {"job": AGENT_JOB, "instance": "trainer-1:9478", "endpoint": "alertmanager"}),
        quiet=Case([("gradwatch_agent_notifications_pending", {"job": AGENT_JOB, "instance": "trainer-1:9478",
                                                               "endpoint": "alertmanager"}, "0x12"),
                    ("gradwatch_agent_notifications_total", {"job": AGENT_JOB, "instance": "trainer-1:9478",
                                                             "endpoint": "alertmanager", "result": "expired"},
                     "0x12")], "10m"),
    ),
]

#: Alerts only the agent sends (rules of the default rules file with no Prometheus twin): (severity, fires when,
#: what to do), for their runbook sections.
AGENT_ONLY = {
    "GradwatchValLossPlateau": ("info", "val_loss (logged with probe.log) has not improved by min_delta for "
                                "`patience` checks (the plateau rule, torch's ReduceLROnPlateau semantics).",
                                "Reduce the learning rate (a rule with mode: act does), or stop a converged run."),
    "GradwatchValLossEarlyStop": ("info", "val_loss met the early-stopping criterion (Lightning's EarlyStopping "
                                  "semantics: no improvement by min_delta for `patience` checks).",
                                  "Stop the run, or let the rule act (mode: act) and keep the best checkpoint."),
}

# -- templates: one text, rendered by Prometheus (Go) and by us (the tests' expectations) -------------
_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]+))?\}")
_HOST_QUERY = ('{{ with printf "gradwatch_run_info{run=%q,rank=%q}" $labels.run $labels.rank | query }}'
               '{{ . | first | label "host" }}{{ end }}')
_RUNS_QUERY = ('{{ range $i, $s := printf "gradwatch_run_info{host=%q}" $labels.Hostname | query }}'
               '{{ if $i }}, {{ end }}{{ $s.Labels.run }}{{ end }}')


def go_dashboard_url(labels: dict[str, str], grafana_url: str) -> str:
    """The alert's dashboard link as a Go template: links.AlertLinks's URL with the labels filled in at firing."""
    keys = ("run", "rank") if "run" in labels else ("instance",)
    placeholders = {key: f"GOLABEL{key.upper()}" for key in keys}
    url = AlertLinks(grafana_url=grafana_url).dashboard_url(placeholders)
    for key, placeholder in placeholders.items():
        url = url.replace(placeholder, f"{{{{ $labels.{key} | urlquery }}}}")
    return url


def _fired_labels(alert: PromAlert) -> dict[str, str]:
    return _RUN if alert.fires.labels is None else alert.fires.labels


def go_template(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name, fmt = m.group(1), m.group(2)
        if name == "host":
            return _HOST_QUERY
        if name == "host_label":  # a series that carries its host (gradwatch_gpu_*)
            return "{{ $labels.host }}"
        if name == "runs":
            return _RUNS_QUERY
        if name == "value":
            return f'{{{{ $value | printf "%{fmt}" }}}}'
        return f"{{{{ $labels.{name} }}}}"
    return _PLACEHOLDER.sub(sub, text)


def _go_printf(fmt: str, value: float) -> str:
    return ("%" + fmt) % value if not fmt.endswith("g") else f"{value:{fmt}}"


def render(text: str, labels: dict[str, str], values: dict[str, Any]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, fmt = m.group(1), m.group(2)
        if name == "host":
            return _HOST_VALUE
        if name == "host_label":
            return labels["host"]
        if name == "value":
            return _go_printf(fmt, values[name])
        if name == "runs":
            return values["runs"]
        return labels[name]
    return _PLACEHOLDER.sub(sub, text)


# -- the files ------------------------------------------------------------------------------------------
_HEADER = ("# Generated by alerts/generate.py from its thresholds and definitions: edit those, then run\n"
           "# `python alerts/generate.py`. docs/alerts.md explains every alert.\n")


def rules_document(links: AlertLinks | None = None) -> dict[str, Any]:
    links = links or AlertLinks()
    rules = []
    for a in ALERTS:
        rules.append({
            "alert": a.name, "expr": a.expr, "for": a.for_,
            "labels": {"severity": a.severity, "source": "prometheus"},
            "annotations": {"summary": go_template(a.summary), "description": go_template(a.description),
                            "hint": a.hint, "runbook_url": links.runbook_url(a.name),
                            "dashboard_url": go_dashboard_url(_fired_labels(a), links.grafana_url)},
        })
    return {"groups": [{"name": "gradwatch-recording", "rules": RECORDING_RULES},
                       {"name": "gradwatch", "rules": rules}]}


def _series(metric: str, labels: dict[str, str]) -> str:
    return metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def tests_document() -> dict[str, Any]:
    tests = []
    for a in ALERTS:
        for kind, case in (("fires", a.fires), ("quiet", a.quiet)):
            expected = []
            if kind == "fires":
                labels = {**(_RUN if case.labels is None else case.labels), "severity": a.severity,
                          "source": "prometheus"}
                expected.append({"exp_labels": labels, "exp_annotations": {
                    "summary": render(a.summary, labels, case.values),
                    "description": render(a.description, labels, case.values), "hint": a.hint,
                    **AlertLinks().annotations({**labels, "alertname": a.name})}})
            tests.append({
                "name": f"{a.name} {'fires' if kind == 'fires' else 'stays quiet'}",
                "interval": "1m",
                "input_series": [{"series": _series(m, lab), "values": v} for m, lab, v in case.series],
                "alert_rule_test": [{"eval_time": case.eval_time, "alertname": a.name, "exp_alerts": expected}],
            })
    return {"rule_files": ["../gradwatch.rules.yml"], "evaluation_interval": "1m", "tests": tests}


def docs_table() -> str:
    rows = ["| alert | severity | fires when | threshold | what to do |", "|---|---|---|---|---|"]
    for a in ALERTS:
        rows.append(f"| `{a.name}` | {a.severity} | {a.meaning} | {a.threshold} | {a.hint} |")
    return "\n".join(rows)


def _agent_rules() -> dict[str, str]:
    """Alert name -> the default rule that sends it."""
    return {alert_name(rule.name): rule.name for rule in default_rules().rules if rule.alert != "none"}


_AGENT_STATE_ALERTS = {"GradwatchRunStalled", "GradwatchRunCrashed", "GradwatchRunFailed"}


def _catalogue_runbooks(rules: dict[str, str]) -> list[tuple[str, str, str, str, str]]:
    """A section per catalogue rule (named after it, as the defaults name them): what it computes, from its
    parameter model's description; what to try is in each alert's summary."""
    defaults = {rule.detect.type: rule for rule in default_rules().rules if rule.catalogue}
    out = []
    for model in CATALOGUE_SPECS:
        kind = catalogue_types()[CATALOGUE_SPECS.index(model)]
        name = alert_name(kind)
        rule = defaults.get(kind)
        severity = rule.alert if rule is not None and rule.alert != "none" else "warning"
        sender = (f"the agent (rule `{rules[name]}` of the defaults, observing)" if name in rules else
                  f"the agent, from a rule named `{kind}` with an alert severity (the defaults record it without one)")
        meaning = " ".join((model.__doc__ or "").replace("``", "`").split())
        out.append((name, severity, sender, f"{meaning} (SageMaker Debugger's `{kind}`: docs/rules.md, \"The "
                    "catalogue\", says what ours counts and where it differs.)",
                    "The alert's summary says what it measured against which threshold, since which step, and "
                    "what to try; `gradwatch inspect RUN` shows the firing among the run's findings."))
    return out


def runbooks() -> str:
    """One section per alert, the target of its runbook_url: who sends it, when, what to do."""
    rules = _agent_rules()
    entries: list[tuple[str, str, str, str, str]] = []  # name, severity, senders, fires when, what to do
    for a in ALERTS:
        senders = []
        if a.name in rules:
            senders.append(f"the agent (rule `{rules[a.name]}`, at the step)")
        elif a.name in _AGENT_STATE_ALERTS:
            senders.append("the agent (from the run's state)")
        senders.append(f"Prometheus: `{a.expr}`" + (f" for {a.for_}" if a.for_ != "0m" else ""))
        entries.append((a.name, a.severity, " and ".join(senders), f"{a.meaning} Threshold: {a.threshold}.",
                        a.hint))
        if a.name == "GradwatchLossDivergence":  # the agent's own val_loss alerts follow the loss alerts
            for name, (severity, meaning, hint) in AGENT_ONLY.items():
                entries.append((name, severity, f"the agent (rule `{rules[name]}`)", meaning, hint))
    entries += _catalogue_runbooks(rules)
    out = []
    for name, severity, senders, meaning, hint in entries:
        out += [f"### `{name}`", "", f"**{severity}**, sent by {senders}.", "", f"**Fires when** {meaning}", "",
                f"**What to do** {hint}", ""]
    return "\n".join(out).rstrip("\n")


def _between(doc: str, start_mark: str, end_mark: str, text: str) -> str:
    start, end = doc.index(start_mark) + len(start_mark), doc.index(end_mark)
    return doc[:start] + "\n" + text + "\n" + doc[end:]


def _dump(doc: dict[str, Any]) -> str:
    return _HEADER + yaml.safe_dump(doc, sort_keys=False, width=120, allow_unicode=True)


def outputs() -> dict[Path, str]:
    doc = DOC_FILE.read_text(encoding="utf-8")
    doc = _between(_between(doc, DOC_START, DOC_END, docs_table()), RUNBOOK_START, RUNBOOK_END, runbooks())
    return {RULES_FILE: _dump(rules_document()), TESTS_FILE: _dump(tests_document()), DOC_FILE: doc}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    parser.add_argument("--docs-url", help="where your site publishes gradwatch's docs/ (for runbook_url)")
    parser.add_argument("--grafana-url", help="your Grafana, as people open it (for dashboard_url)")
    parser.add_argument("-o", "--output", type=Path, help="with --docs-url/--grafana-url: write the rules file here")
    args = parser.parse_args(argv)
    if args.docs_url or args.grafana_url or args.output:
        if not args.output:
            parser.error("--docs-url and --grafana-url write a rules file of your own: give its path with -o")
        defaults = AlertLinks()
        links = AlertLinks(docs_url=args.docs_url or defaults.docs_url, grafana_url=args.grafana_url or
                           defaults.grafana_url)
        args.output.write_text(_dump(rules_document(links)), encoding="utf-8")
        print(f"wrote {args.output}")
        return 0
    stale = 0
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                       str(path), "generated"))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"\n{stale} file(s) out of date: run python alerts/generate.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
