"""Generate the Grafana dashboards (run, fleet, debug) with Grafana's foundation SDK.

    python -m gradwatch.dashboards.generate           # rewrite dashboards/*.json
    python -m gradwatch.dashboards.generate --check   # exit 1 if a committed file is stale

The JSON files are committed and packaged (``gradwatch dashboards export/push`` need no SDK);
tests/dashboards/ fails when they differ from what this file generates, and runs every query
against a real Prometheus scraping a live run. Queries name only metrics of docs/metrics.md
(and Prometheus's own ``ALERTS``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models import prometheus as prometheus_models

HERE = Path(__file__).resolve().parent
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
HOST = 'instance=~"$instance"'  # the agents (one per host) the dashboards show: All by default
RUN = f'run="$run",{HOST}'
RANK = f'run="$run",rank=~"$rank",{HOST}'
FLEET = f'run!="",{HOST}'
TAGS = ["gradwatch"]
GREEN, ORANGE, RED, GREY, BLUE, PURPLE = "green", "orange", "red", "text", "blue", "purple"
#: Per-layer update/weight ratios: about 1e-3 is healthy for Adam-style training; above 1e-2 the
#: weights change fast relative to their size (Karpathy, "A Recipe for Training Neural Networks").
UPDATE_RATIO_WARN, UPDATE_RATIO_HIGH = 1e-2, 1e-1
DIVERGENCE_COUNTERS = ("gradwatch_nonfinite_total", "gradwatch_spikes_total")


# -- building blocks ------------------------------------------------------------------------------------
def query(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False, table_format: bool = False
          ) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    q = q.instant() if instant else q.range()
    if table_format:
        q = q.format(prometheus_models.PromQueryFormat.TABLE)
    return q


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return dashboard.ThresholdsConfig().mode(models.ThresholdsMode.ABSOLUTE).steps(
        [models.Threshold(value=value, color=color) for value, color in steps])


def legend_table(*calcs: str) -> common.VizLegendOptions:
    return (common.VizLegendOptions().display_mode(common_models.LegendDisplayMode.TABLE)
            .placement(common_models.LegendPlacement.BOTTOM).show_legend(True).calcs(list(calcs or ["lastNotNull"])))


def series(title: str, description: str, *queries: prometheus.Dataquery, unit: str = "short", width: int = 12,
           height: int = 8, log_scale: bool = False, bars: bool = False) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(width).height(height).line_width(1).fill_opacity(10 if not bars else 80)
             .show_points(common_models.VisibilityMode.NEVER).span_nulls(True)
             .legend(legend_table("lastNotNull", "max"))
             .tooltip(common.VizTooltipOptions().mode(common_models.TooltipDisplayMode.MULTI)
                      .sort(common_models.SortOrder.DESCENDING)))
    if log_scale:
        panel = panel.scale_distribution(common.ScaleDistributionConfig().type(common_models.ScaleDistribution.LOG)
                                         .log(10))
    if bars:
        panel = panel.draw_style(common_models.GraphDrawStyle.BARS)
    for q in queries:
        panel = panel.with_target(q)
    return panel


def dashed(panel: timeseries.Panel, series_name: str, color: str) -> timeseries.Panel:
    """Draw one series (e.g. the clip threshold) as a dashed line of a fixed colour."""
    return panel.override_by_name(series_name, [
        models.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        models.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color}),
        models.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
    ])


def single(title: str, description: str, expr: str, *, unit: str = "short", width: int = 4,
           steps: tuple[tuple[float | None, str], ...] = ((None, BLUE),),
           mappings: list[models.ValueMap] | None = None) -> stat.Panel:
    panel = (stat.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit).span(width)
             .height(4).with_target(query(expr, instant=True)).thresholds(thresholds(*steps))
             .color_mode(common_models.BigValueColorMode.BACKGROUND)
             .graph_mode(common_models.BigValueGraphMode.NONE)
             .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"])))
    if mappings:
        panel = panel.mappings(mappings)
    return panel


#: a run's states, least worrying first: a run's state is its worst rank's (agent/state.py run_status)
STATES = (("finished", GREY), ("interrupted", PURPLE), ("running", GREEN), ("stalled", ORANGE), ("failed", RED),
          ("crashed", RED))
STATE_CODE = "max by (run) (" + " or ".join(f'gradwatch_run_state{{%s,state="{name}"}} * {code}'
                                            for code, (name, _) in enumerate(STATES)) + ")"
STATE_MAPPINGS = [models.ValueMap(options={
    str(code): models.ValueMappingResult(text=name, color=color, index=code) for code, (name, color) in enumerate(STATES)
})]


def state_code(selector: str) -> str:
    """The worst state of a run's ranks as a number: the index of its state in STATES."""
    return STATE_CODE % ((selector,) * len(STATES))


def datasource_variable() -> dashboard.DatasourceVariable:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def host_variable() -> dashboard.QueryVariable:
    """The agents to show, by scrape target (one agent per host): every dashboard filters on it."""
    return (dashboard.QueryVariable("instance").label("Host").datasource(DATASOURCE)
            .query("label_values(gradwatch_run_info, instance)")
            .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(models.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(models.VariableOption(selected=True, text="All", value="$__all")))


def run_variable() -> dashboard.QueryVariable:
    return (dashboard.QueryVariable("run").label("Run").datasource(DATASOURCE)
            .query(f"label_values(gradwatch_run_info{{{HOST}}}, run)").refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(models.VariableSort.ALPHABETICAL_ASC))


def rank_variable() -> dashboard.QueryVariable:
    return (dashboard.QueryVariable("rank").label("Rank").datasource(DATASOURCE)
            .query(f"label_values(gradwatch_run_info{{{RUN}}}, rank)")
            .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(models.VariableSort.NUMERICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(models.VariableOption(selected=True, text="All", value="$__all")))


def annotation_queries(run_scoped: bool) -> list[dashboard.AnnotationQuery]:
    """Actions and alerts on every time-series panel: from gradwatch's Grafana annotations (agent
    setting grafana_url), from the action counters, and from Prometheus's alerts."""
    tag = "run:$run" if run_scoped else "gradwatch"
    scope = RUN if run_scoped else FLEET
    return [
        dashboard.AnnotationQuery().name("gradwatch actions and alerts").enable(True).icon_color("purple")
        .datasource(models.DataSourceRef(type_val="datasource", uid="grafana"))
        .target(dashboard.AnnotationTarget().type("tags").tags([tag]).match_any(False).limit(200)),
        dashboard.AnnotationQuery().name("Actions (from counters)").enable(True).icon_color(ORANGE)
        .datasource(DATASOURCE)
        .expr(f"sum by (run, action, reason) (changes(gradwatch_actions_total{{{scope}}}[1m])) > 0"),
        dashboard.AnnotationQuery().name("Prometheus alerts").enable(True).icon_color(RED).datasource(DATASOURCE)
        .expr(f'ALERTS{{alertstate="firing",{scope}}}'),
    ]


def base(uid: str, title: str, description: str) -> dashboard.Dashboard:
    return (dashboard.Dashboard(title).uid(uid).description(description).tags(TAGS).refresh("10s")
            .time("now-30m", "now").timezone("browser").tooltip(models.DashboardCursorSync.CROSSHAIR)
            .readonly()
            .link(dashboard.DashboardLink("gradwatch").type(models.DashboardLinkType.DASHBOARDS).tags(TAGS)
                  .as_dropdown(True).include_vars(True).keep_time(True)))


# -- the dashboards ---------------------------------------------------------------------------------------
def run_dashboard() -> dashboard.Dashboard:
    d = (base("gradwatch-run", "gradwatch / Run", "One training run: loss, gradients, learning rate, speed and "
              "GPUs, with gradwatch's actions and alerts as annotations.")
         .with_variable(datasource_variable()).with_variable(host_variable()).with_variable(run_variable())
         .with_variable(rank_variable()))
    for a in annotation_queries(run_scoped=True):
        d = d.annotation(a)
    d = (d.with_row(dashboard.Row("Run"))
         .with_panel(single("State", "Worst state of the run's ranks.", state_code(RUN), mappings=STATE_MAPPINGS,
                            steps=((None, GREY), (1, GREEN), (2, ORANGE), (3, RED))))
         .with_panel(single("Step", "Optimizer steps completed (highest rank).", f'max(gradwatch_steps_total{{{RUN},optimizer="0"}})'))
         .with_panel(single("Loss", "Last loss logged by rank 0.", f'gradwatch_loss{{{RUN},rank="0",optimizer="0"}}'))
         .with_panel(single("Steps/s", "Optimizer steps per second over the last minute.",
                            f'max(rate(gradwatch_steps_total{{{RUN},optimizer="0"}}[1m]))'))
         .with_panel(single("Alerts firing", "Prometheus alerts firing for this run (alerts/gradwatch.rules.yml).",
                            f'count(ALERTS{{alertstate="firing",{RUN}}}) or vector(0)',
                            steps=((None, GREEN), (1, RED))))
         .with_panel(single("Records dropped", "Records the probe dropped (queue full, spool unwritable).",
                            f"sum(gradwatch_probe_dropped_records_total{{{RUN}}})", steps=((None, GREEN), (1, ORANGE))))
         .with_row(dashboard.Row("Training"))
         .with_panel(dashed(series(
             "Loss", "Loss per rank, its 2-minute trend, and the largest loss of the recent window (catches one-step "
             "spikes between two scrapes).",
             query(f"gradwatch_loss{{{RANK}}}", "loss r{{rank}} opt {{optimizer}}"),
             query(f"avg_over_time(gradwatch_loss{{{RANK}}}[2m])", "trend (2m) r{{rank}} opt {{optimizer}}", "B"),
             query(f"gradwatch_loss_recent_max{{{RANK}}}", "recent max r{{rank}}", "C")), "recent max r0", RED))
         .with_panel(series("Logged scalars", "Every other scalar logged with probe.log() (val_loss, accuracy...).",
                            query(f'gradwatch_metric{{{RANK},name!="batch_size"}}', "{{name}} r{{rank}}")))
         .with_panel(dashed(series(
             "Gradient norm and clip threshold", "Global L2 gradient norm before clipping, and the clipping threshold "
             "in force (gradwatch's fixed, AutoClip or ZClip guard, or the max_norm of the script's own "
             "clip_grad_norm_). Above the dashed line, gradients were scaled down.",
             query(f"gradwatch_grad_norm{{{RANK}}}", "grad norm r{{rank}} opt {{optimizer}}"),
             query(f"gradwatch_clip_threshold{{{RANK}}}", "clip threshold r{{rank}}", "B"),
             query(f"gradwatch_grad_norm_recent_max{{{RANK}}}", "recent max r{{rank}}", "C"), log_scale=True),
             "clip threshold r0", RED))
         .with_panel(series("Learning rate", "Learning rate of each optimizer param group (none when the script "
                            "updates its parameters by hand, without an optimizer).",
                            query(f"gradwatch_learning_rate{{{RANK}}}", "opt {{optimizer}} group {{group}} r{{rank}}"),
                            log_scale=True))
         .with_row(dashboard.Row("Speed"))
         .with_panel(series("Throughput", "Optimizer steps and samples per second (rate over the scrape window).",
                            query(f'rate(gradwatch_steps_total{{{RANK},optimizer="0"}}[$__rate_interval])',
                                  "steps/s r{{rank}}"),
                            query(f"rate(gradwatch_samples_total{{{RANK}}}[$__rate_interval])", "samples/s r{{rank}}",
                                  "B"), width=8))
         .with_panel(series("Step time vs data wait", "Mean wall time per optimizer step over the rate window, and "
                            "the part of it spent waiting for the next batch (rates of the _seconds_total counters: "
                            "every step counts, not the one a scrape happened to see). Data wait close to step time: "
                            "the input pipeline is the bottleneck.",
                            query(f"rate(gradwatch_step_seconds_total{{{RANK}}}[$__rate_interval]) / on (run, rank) "
                                  f'rate(gradwatch_steps_total{{{RANK},optimizer="0"}}[$__rate_interval])',
                                  "step r{{rank}}"),
                            query(f"rate(gradwatch_data_wait_seconds_total{{{RANK}}}[$__rate_interval]) / on (run, rank) "
                                  f'rate(gradwatch_steps_total{{{RANK},optimizer="0"}}[$__rate_interval])',
                                  "data wait r{{rank}}", "B"),
                            unit="s", width=8))
         .with_panel(series("Clipped fraction and non-finite values", "Fraction of steps whose gradients were clipped, "
                            "NaN/inf values seen per scrape interval, and steps GradScaler skipped (inf/NaN in the "
                            "scaled gradients: a few while it calibrates are normal in fp16).",
                            query(f"gradwatch_clipped_fraction{{{RANK}}}", "clipped fraction r{{rank}}"),
                            query(f"sum by (rank, quantity) (increase(gradwatch_nonfinite_total{{{RANK}}}"
                                  f"[$__rate_interval]))", "non-finite {{quantity}} r{{rank}}", "B"),
                            # "or 0 x steps": a run GradScaler never skipped shows 0, not an empty series
                            query(f'sum by (rank) (increase(gradwatch_actions_total{{{RANK},action="skip_step",'
                                  f'reason="amp"}}[$__rate_interval])) or sum by (rank) (0 * gradwatch_steps_total'
                                  f'{{{RANK}}})', "GradScaler skipped r{{rank}}", "C"),
                            width=8))
         .with_row(dashboard.Row("GPUs"))
         .with_panel(series("GPU utilisation", "Fraction of time a kernel ran on each GPU of the run (NVML).",
                            query(f"gradwatch_gpu_utilization_ratio{{{RANK}}}", "GPU {{gpu}} r{{rank}}"),
                            unit="percentunit", width=6))
         .with_panel(series("GPU memory", "Device memory used (all processes, NVML) and held by the run's CUDA "
                            "allocator (allocated, reserved), against the device's total.",
                            query(f"gradwatch_gpu_memory_used_bytes{{{RANK}}}", "used GPU {{gpu}}"),
                            query(f"gradwatch_cuda_memory_allocated_bytes{{{RANK}}}", "allocated r{{rank}}", "B"),
                            query(f"gradwatch_cuda_memory_reserved_bytes{{{RANK}}}", "reserved r{{rank}}", "C"),
                            query(f"gradwatch_gpu_memory_total_bytes{{{RANK}}}", "total GPU {{gpu}}", "D"),
                            unit="bytes", width=6))
         .with_panel(series("GPU power", "Power draw of the run's GPUs (NVML).",
                            query(f"gradwatch_gpu_power_watts{{{RANK}}}", "GPU {{gpu}}"), unit="watt", width=6))
         .with_panel(series("GPU temperature and throttling", "Core temperature; clocks held down (power cap, "
                            "thermal...) show as throttle reasons.",
                            query(f"gradwatch_gpu_temperature_celsius{{{RANK}}}", "GPU {{gpu}} °C"),
                            query(f"gradwatch_gpu_throttled{{{RANK}}} == 1", "GPU {{gpu}} throttled: {{reason}}", "B"),
                            unit="celsius", width=6)))
    return d


def fleet_dashboard() -> dashboard.Dashboard:
    scope = FLEET
    runs_table = (
        table.Panel().title("Runs").description("Every run the agents export: worst state of its ranks, last step, "
                                                "loss, alerts firing, divergence events and GPUs. Stalled, crashed "
                                                "and diverging runs are coloured.")
        .datasource(DATASOURCE).span(24).height(10)
        .with_target(query(state_code(scope), ref="state", instant=True, table_format=True))
        .with_target(query(f'max by (run) (gradwatch_steps_total{{{scope},optimizer="0"}})', ref="step", instant=True,
                           table_format=True))
        .with_target(query(f'max by (run) (gradwatch_loss{{{scope},rank="0",optimizer="0"}})', ref="loss", instant=True,
                           table_format=True))
        .with_target(query(f'count by (run) (ALERTS{{alertstate="firing",{scope}}}) or on (run) '
                           f"(0 * max by (run) (gradwatch_run_state{{{scope}}}))", ref="alerts", instant=True, table_format=True))
        .with_target(query(" + on (run) ".join(per_run(f"increase({name}{{{scope}}}[15m])", scope)
                                                 for name in DIVERGENCE_COUNTERS),
                           ref="divergence", instant=True, table_format=True))
        .with_target(query(f"count by (run) (gradwatch_gpu_utilization_ratio{{{scope}}}) or on (run) "
                           f"(0 * max by (run) (gradwatch_run_state{{{scope}}}))", ref="gpus", instant=True,
                           table_format=True))
        .with_target(query(f"avg by (run) (gradwatch_gpu_utilization_ratio{{{scope}}})", ref="gpu_util", instant=True,
                           table_format=True))
        .with_transformation(models.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(models.DataTransformerConfig(id_val="organize", options={
            "excludeByName": {"Time": True},
            "renameByName": {"Value #state": "State", "Value #step": "Step", "Value #loss": "Loss (rank 0)",
                             "Value #alerts": "Alerts firing", "Value #divergence": "NaN/spikes (15m)",
                             "Value #gpus": "GPUs", "Value #gpu_util": "GPU utilisation", "run": "Run"},
            "indexByName": {"run": 0, "Value #state": 1, "Value #step": 2, "Value #loss": 3, "Value #alerts": 4,
                            "Value #divergence": 5, "Value #gpus": 6, "Value #gpu_util": 7}}))
        .override_by_name("State", [
            models.DynamicConfigValue(id_val="mappings", value=[_plain(m) for m in STATE_MAPPINGS]),
            models.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"}),
            models.DynamicConfigValue(id_val="thresholds", value={"mode": "absolute", "steps": [
                {"value": None, "color": GREY}, {"value": 1, "color": GREEN}, {"value": 2, "color": ORANGE},
                {"value": 3, "color": RED}]})])
        .override_by_name("Alerts firing", _alarm_cells())
        .override_by_name("NaN/spikes (15m)", _alarm_cells())
        .override_by_name("GPU utilisation", [
            models.DynamicConfigValue(id_val="unit", value="percentunit"),
            models.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "gauge", "mode": "basic"}),
            models.DynamicConfigValue(id_val="min", value=0), models.DynamicConfigValue(id_val="max", value=1)])
        .override_by_name("Run", [models.DynamicConfigValue(id_val="links", value=[
            run_link("Run dashboard", "gradwatch-run"), run_link("Debug dashboard", "gradwatch-debug")])])
        .sort_by([common.TableSortByFieldState().display_name("State").desc(True)])
    )
    d = (base("gradwatch-fleet", "gradwatch / Fleet", "Every run on every machine: which are running, stalled, "
              "crashed or diverging, and how busy their GPUs are.").with_variable(datasource_variable())
         .with_variable(host_variable()))
    for a in annotation_queries(run_scoped=False):
        d = d.annotation(a)
    return (d.with_row(dashboard.Row("Runs"))
            .with_panel(single("Running", "Runs with a rank still training.",
                               f'sum(gradwatch_agent_runs{{state="running",{HOST}}})', steps=((None, GREEN),),
                               width=6))
            .with_panel(single("Stalled", "Runs with a rank that stopped reporting (agent setting "
                               "stall_after_seconds).", f'sum(gradwatch_agent_runs{{state="stalled",{HOST}}})',
                               steps=((None, GREEN), (1, ORANGE)), width=6))
            .with_panel(single("Crashed or failed", "Runs whose process died or raised (crashed), or whose script exited "
                               "with a non-zero status (failed). Interrupted runs (Ctrl-C, SIGTERM) are not counted.",
                               f'sum(gradwatch_agent_runs{{state=~"crashed|failed",{HOST}}})',
                               steps=((None, GREEN), (1, RED)),
                               width=6))
            .with_panel(single("Alerts firing", "Prometheus alerts firing, all runs.",
                               f'count(ALERTS{{alertstate="firing",alertname=~"Gradwatch.*",{HOST}}}) or vector(0)',
                               steps=((None, GREEN), (1, RED)), width=6))
            .with_panel(runs_table)
            .with_row(dashboard.Row("Progress"))
            .with_panel(series("Loss by run", "Loss of rank 0 of every run.",
                               query(f'gradwatch_loss{{rank="0",optimizer="0",{HOST}}}', "{{run}}"), log_scale=True))
            .with_panel(series("Steps per second by run", "Optimizer steps per second (rank 0).",
                               query(f'rate(gradwatch_steps_total{{rank="0",optimizer="0",{HOST}}}[$__rate_interval])',
                                     "{{run}}")))
            .with_row(dashboard.Row("GPUs across hosts"))
            .with_panel(series("GPU utilisation", "Every GPU the agents see, by host and the run on it (empty run: "
                               "idle or used by something else).",
                               query(f"gradwatch_gpu_utilization_ratio{{{HOST}}}", "{{host}} GPU {{gpu}} {{run}}"),
                               unit="percentunit"))
            .with_panel(series("GPUs in use by host", "GPUs the agents see, and how many of them run a gradwatch run.",
                               query(f"count by (host) (gradwatch_gpu_utilization_ratio{{{HOST}}})", "{{host}} all"),
                               query(f"count by (host) (gradwatch_gpu_utilization_ratio{{{FLEET}}})",
                                     "{{host}} in a run", "B"))))


def debug_dashboard() -> dashboard.Dashboard:
    top = "topk($topk, %s)"
    d = (base("gradwatch-debug", "gradwatch / Debug", "Inside a run: per-layer gradient norms and update/weight "
              "ratios, non-finite values, spikes, rewinds, skipped steps and rule decisions.")
         .with_variable(datasource_variable()).with_variable(host_variable()).with_variable(run_variable())
         .with_variable(rank_variable())
         .with_variable(dashboard.CustomVariable("topk").label("Top layers").values("5,10")
                        .current(models.VariableOption(selected=True, text="10", value="10"))))
    for a in annotation_queries(run_scoped=True):
        d = d.annotation(a)
    return (d.with_row(dashboard.Row("Layers"))
            .with_panel(series("Gradient norm by layer (top $topk)", "L2 norm of each layer's gradients at the sampled "
                               "steps (attach(layer_stats_every=...)): a layer far above the others is where an "
                               "explosion starts.", query(top % f"gradwatch_layer_grad_norm{{{RANK}}}",
                                                          "{{layer}} r{{rank}}"), log_scale=True))
            .with_panel(series("Update/weight ratio by layer (top $topk)", "||Δw|| / ||w|| per layer and step: about "
                               "1e-3 is healthy; above 1e-2 (orange) the layer's weights change fast, above 1e-1 (red) "
                               "it is being overwritten.",
                               query(top % f"gradwatch_layer_update_ratio{{{RANK}}}", "{{layer}} r{{rank}}"),
                               log_scale=True)
                        .thresholds(thresholds((None, GREEN), (UPDATE_RATIO_WARN, ORANGE), (UPDATE_RATIO_HIGH, RED)))
                        .thresholds_style(common.GraphThresholdsStyleConfig()
                                          .mode(common_models.GraphThresholdsStyleMode.LINE)))
            .with_panel(layer_bars("Gradient norm by layer, now", "The layers with the largest gradient norm at the "
                                   "last sampled step.", top % f"gradwatch_layer_grad_norm{{{RANK}}}"))
            .with_panel(layer_bars("Update/weight ratio by layer, now", "The layers with the largest update/weight "
                                   "ratio at their last measured step.",
                                   top % f"gradwatch_layer_update_ratio{{{RANK}}}")
                        .thresholds(thresholds((None, GREEN), (UPDATE_RATIO_WARN, ORANGE), (UPDATE_RATIO_HIGH, RED))))
            .with_row(dashboard.Row("Events"))
            .with_panel(series("Non-finite values", "NaN or inf seen per interval, by quantity (loss, grad_norm, "
                               "metric).", query(f"sum by (rank, quantity) (increase(gradwatch_nonfinite_total{{{RANK}}}"
                                                 f"[$__rate_interval]))", "{{quantity}} r{{rank}}"), bars=True,
                               width=8))
            .with_panel(series("Spikes", "Upward spikes detected at step resolution, by quantity.",
                               query(f"sum by (rank, quantity) (increase(gradwatch_spikes_total{{{RANK}}}"
                                     f"[$__rate_interval]))", "{{quantity}} r{{rank}}"), bars=True, width=8))
            .with_panel(series("Rewinds and skipped steps", "Rewinds to a snapshot and optimizer updates skipped, by "
                               "reason.", query(f'sum by (rank, action, reason) (increase(gradwatch_actions_total{{{RANK},'
                                                f'action=~"rewind|skip_step"}}[$__rate_interval]))',
                                                "{{action}} ({{reason}}) r{{rank}}"), bars=True, width=8))
            .with_panel(series("Rule decisions", "Times each rule fired, by action and mode (act, observe, dry_run).",
                               query(f"sum by (rule, action, mode) (increase(gradwatch_rule_decisions_total{{{RUN}}}"
                                     f"[$__rate_interval]))", "{{rule}}: {{action}} ({{mode}})"), bars=True, width=8))
            .with_panel(series("Rule firings", "Times each rule's detector fired, also while cooldown or max_actions "
                               "kept it from deciding: the catalogue's rules (vanishing_gradient, dead layers, "
                               "overfit...: docs/rules.md) and every other. The evidence is in gradwatch status and the "
                               "alert's summary.",
                               query(f"sum by (rule) (increase(gradwatch_rule_fired_total{{{RUN}}}[$__rate_interval]))",
                                     "{{rule}}"), bars=True, width=8))
            .with_panel(series("All actions carried out", "Every corrective action (stop, reduce_lr, scale_clip, "
                               "rewind, skip_step), cumulative.",
                               query(f"sum by (action, reason) (gradwatch_actions_total{{{RANK}}})",
                                     "{{action}} ({{reason}})"), width=8))
            .with_row(dashboard.Row("Probe health"))
            .with_panel(series("Records dropped and late commands", "Records the probe could not keep, and commands "
                               "that arrived after their step (applied at once).",
                               query(f"gradwatch_probe_dropped_records_total{{{RANK}}}", "dropped r{{rank}}"),
                               query(f"gradwatch_commands_late_total{{{RANK}}}", "late commands r{{rank}}", "B"),
                               width=24)))


def layer_bars(title: str, description: str, expr: str) -> bargauge.Panel:
    """Horizontal bars, one per layer: which layers stand out right now."""
    return (bargauge.Panel().title(title).description(description).datasource(DATASOURCE)
            .with_target(query(expr, "{{layer}} r{{rank}}", instant=True)).span(12).height(8)
            .orientation(common_models.VizOrientation.HORIZONTAL).display_mode(common_models.BarGaugeDisplayMode.GRADIENT)
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"])))


def per_run(expr: str, scope: str) -> str:
    """``expr`` summed per run, 0 for a run that has none of its series: so that adding two of them keeps a run
    that has only one side ("a + b" alone matches series label for label and drops it)."""
    return f"(sum by (run) ({expr}) or on (run) 0 * max by (run) (gradwatch_run_state{{{scope}}}))"


def run_link(title: str, uid: str) -> dict[str, Any]:
    """A data link from a table's run cell to a run-scoped dashboard: that run, the same data source, hosts and
    time range."""
    return {"title": title, "url": f"/d/{uid}?var-run=${{__value.raw}}&${{datasource:queryparam}}"
                                   "&${instance:queryparam}&${__url_time_range}", "targetBlank": False}


def _alarm_cells() -> list[models.DynamicConfigValue]:
    return [models.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"}),
            models.DynamicConfigValue(id_val="thresholds", value={"mode": "absolute", "steps": [
                {"value": None, "color": "transparent"}, {"value": 1, "color": RED}]})]


def _plain(obj: object) -> object:
    return json.loads(JSONEncoder().encode(obj))


DASHBOARDS = {"run": run_dashboard, "fleet": fleet_dashboard, "debug": debug_dashboard}


def render(name: str) -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(DASHBOARDS[name]().build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed dashboard is stale")
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = HERE / f"{name}.json"
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m gradwatch.dashboards.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
