"""Every metric the agent exports, in one reviewed table (names, types, labels, help).

Names follow Prometheus conventions: one ``gradwatch_`` namespace, snake_case, base units
in the name, ``_total`` on counters. tests/agent/test_catalogue.py enforces them and
``promtool check metrics`` runs over a real scrape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

RUN_LABELS = ("run", "rank")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # full exposed name (counters include _total)
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...] = RUN_LABELS

    def family(self) -> Family:
        if self.kind == "counter":
            return CounterMetricFamily(self.name.removesuffix("_total"), self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)


Family = GaugeMetricFamily | CounterMetricFamily


def _run(name: str, kind: Literal["gauge", "counter"], help: str, *extra: str) -> MetricSpec:
    return MetricSpec(name, kind, help, RUN_LABELS + extra)


# -- per run and rank -----------------------------------------------------------------------------
# optimizer: "0" is the run's first optimizer (its steps are the run's steps); a run with several optimizers
# stepping in turn (a GAN) has one series per optimizer, named "1", "2"... (docs/attaching.md)
LOSS = _run("gradwatch_loss", "gauge", "Last loss the run logged with probe.log(loss=...), or the loss of the backward "
            "passes before this optimizer's step.", "optimizer")
GRAD_NORM = _run("gradwatch_grad_norm", "gauge",
                 "L2 norm of the gradients of the optimizer's own parameters at its last step (unscaled, before "
                 "clipping and the update).", "optimizer")
LEARNING_RATE = _run("gradwatch_learning_rate", "gauge",
                     "Learning rate each optimizer param group's last update used: the script's or its scheduler's, "
                     "times gradwatch's LR cuts (which hold as a ratio to whatever sets the LR).", "optimizer", "group")
STEPS = _run("gradwatch_steps_total", "counter", "Steps the optimizer has completed (optimizer 0: the run's steps).",
             "optimizer")
STEP_DURATION = _run("gradwatch_step_duration_seconds", "gauge",
                     "Wall time of the last optimizer step, from the end of the previous step to the end of this one "
                     "(the last value only: for averages, gradwatch_step_seconds_total).")
DATA_WAIT = _run("gradwatch_data_wait_seconds", "gauge",
                 "Time from the end of the last optimizer step to the next forward pass (data loading; the last "
                 "value only: for averages, gradwatch_data_wait_seconds_total).")
STEP_SECONDS = _run("gradwatch_step_seconds_total", "counter",
                    "Wall time of the run's optimizer steps, summed: rate() of it over rate(gradwatch_steps_total) is "
                    "the mean step time, whatever the scrape interval.")
DATA_WAIT_SECONDS = _run("gradwatch_data_wait_seconds_total", "counter",
                         "Time spent waiting for the next batch, summed: rate() of it over "
                         "rate(gradwatch_step_seconds_total) is the fraction of the time the loop waits for data.")
SAMPLES_PER_SECOND = _run("gradwatch_samples_per_second", "gauge",
                          "Samples per second at the last step: logged batch_size over step duration.")
SAMPLES = _run("gradwatch_samples_total", "counter", "Samples processed: sum of the logged batch_size.")
NONFINITE = _run("gradwatch_nonfinite_total", "counter",
                 "Non-finite (NaN or infinite) values seen, by quantity (loss, grad_norm, metric).", "quantity")
SPIKES = _run("gradwatch_spikes_total", "counter",
              "Upward spikes detected at step resolution (z-score over 6 against an outlier-free moving average).",
              "quantity")
LOSS_RECENT_MAX = _run("gradwatch_loss_recent_max", "gauge",
                       "Largest finite loss logged in the recent window (agent setting spike_window_seconds).")
GRAD_NORM_RECENT_MAX = _run("gradwatch_grad_norm_recent_max", "gauge",
                            "Largest finite gradient norm in the recent window (agent setting spike_window_seconds).")
LAST_STEP_TIMESTAMP = _run("gradwatch_last_step_timestamp_seconds", "gauge",
                           "Unix time of the last optimizer step.")
RUN_START_TIMESTAMP = _run("gradwatch_run_start_timestamp_seconds", "gauge", "Unix time the process attached its probe.")
RUN_INFO = MetricSpec(
    "gradwatch_run_info", "gauge",
    "Run metadata as labels (value is always 1); user labels appear as label_<key>. worker: the process name of "
    "a multiprocessing worker without a rank of its own (Hogwild; its rank label is its index), else empty.",
    RUN_LABELS + ("host", "pid", "local_rank", "world_size", "torch_version", "gradwatch_version", "worker"),
)
RUN_STATE = _run("gradwatch_run_state", "gauge",
                 "1 for the current state of the process, else 0: running, stalled, crashed (gone without finishing, "
                 "or raised), failed (exited with a non-zero status), interrupted (Ctrl-C, SIGTERM), finished.",
                 "state")
METRIC = _run("gradwatch_metric", "gauge", "Last value of every other scalar logged with probe.log(name=value) "
              "(`loss` and `batch_size` have their own series above).", "name")
ACTIONS = _run("gradwatch_actions_total", "counter",
               "Corrective actions carried out in the process, by action (stop, reduce_lr, scale_clip, rewind, "
               "skip_step) and reason (the detector that fired, e.g. spike, plateau, nonfinite).", "action", "reason")
COMMANDS_LATE = _run("gradwatch_commands_late_total", "counter",
                     "Agent commands this process received after the step they were meant for (applied at once).")
CLIP_THRESHOLD = _run("gradwatch_clip_threshold", "gauge",
                      "Gradient-clipping threshold in force at the last step (guards.clip: fixed, autoclip or zclip).")
CLIPPED_STEPS = _run("gradwatch_clipped_steps_total", "counter", "Steps whose gradients the clipping guard scaled down.")
CLIPPED_FRACTION = _run("gradwatch_clipped_fraction", "gauge",
                        "Fraction of the steps with a clipping threshold whose gradients were clipped.")
RULE_DECISIONS = _run(
    "gradwatch_rule_decisions_total", "counter",
    "Times a rule fired, by rule, action and mode (act: sent to the probes; observe or dry_run: recorded only). "
    "Agent rules read rank 0; rule guards.skip counts the skips an observing guard would have made.",
    "rule", "action", "mode")
RULE_FIRED = _run(
    "gradwatch_rule_fired_total", "counter",
    "Times a rule's detector fired, by rule, also while cooldown or max_actions kept the rule from deciding "
    "(the catalogue's rules: docs/rules.md). Agent rules read rank 0.", "rule")
PROBE_DROPPED = _run("gradwatch_probe_dropped_records_total", "counter",
                     "Records the probe dropped (queue full, spool unwritable): training went on without them.")
VALUES_DROPPED = _run("gradwatch_logged_values_dropped_total", "counter",
                      "Logged values that were not kept, by reason: unreadable (the probe could not read the value, "
                      "e.g. a tensor on the meta device; the step's other values were recorded), over_cap (a metric "
                      "name beyond the 64 per rank the agent keeps).", "reason")
LAYER_GRAD_NORM = _run(
    "gradwatch_layer_grad_norm", "gauge",
    "Gradient L2 norm of a layer (the module owning the parameters) at the last sampled step "
    "(attach(layer_stats_every=...)), before the script's or the framework's clipping, as gradwatch_grad_norm; "
    "the 10 layers with the largest norm.", "layer")
LAYER_UPDATE_RATIO = _run(
    "gradwatch_layer_update_ratio", "gauge",
    "Update/weight ratio ||w_after - w_before|| / ||w_before|| of a layer at its last measured step; the 10 "
    "largest.", "layer")
CUDA_MEMORY_ALLOCATED = _run("gradwatch_cuda_memory_allocated_bytes", "gauge",
                             "Bytes held by tensors in the process's CUDA caching allocator (sampled every second).")
CUDA_MEMORY_RESERVED = _run("gradwatch_cuda_memory_reserved_bytes", "gauge",
                            "Bytes the process's CUDA caching allocator has reserved from the device.")
CUDA_MEMORY_PEAK = _run("gradwatch_cuda_memory_peak_allocated_bytes", "gauge",
                        "Peak bytes held by tensors in the process since it started (or the last reset).")
CUDA_MEMORY_TOTAL = _run("gradwatch_cuda_memory_total_bytes", "gauge", "Total memory of the process's CUDA device.")

# -- GPUs of this machine, through NVML (agent/gpus.py) -------------------------------------------------
GPU_LABELS = ("gpu", "uuid", "host", "run", "rank")  # run and rank: the gradwatch process using it ("" if none)


def _gpu(name: str, help: str, *extra: str) -> MetricSpec:
    return MetricSpec(name, "gauge", help, GPU_LABELS + extra)


GPU_UTILIZATION = _gpu("gradwatch_gpu_utilization_ratio",
                       "Fraction of the last sample period in which a kernel ran on the GPU (NVML).")
GPU_MEMORY_USED = _gpu("gradwatch_gpu_memory_used_bytes", "Device memory in use, all processes (NVML).")
GPU_MEMORY_TOTAL = _gpu("gradwatch_gpu_memory_total_bytes", "Device memory of the GPU (NVML).")
GPU_POWER = _gpu("gradwatch_gpu_power_watts", "Power draw of the GPU (NVML).")
GPU_TEMPERATURE = _gpu("gradwatch_gpu_temperature_celsius", "GPU core temperature (NVML).")
GPU_SM_CLOCK = _gpu("gradwatch_gpu_sm_clock_hertz", "Current SM clock of the GPU (NVML).")
GPU_THROTTLED = _gpu("gradwatch_gpu_throttled", "1 while the GPU's clocks are held down for the reason (power_cap, "
                     "thermal, hw_slowdown, power_brake, sync_boost, app_clocks), else 0 (NVML).", "reason")

# -- the agent itself -----------------------------------------------------------------------------
AGENT_INGESTED = MetricSpec("gradwatch_agent_records_ingested_total", "counter", "Spool records ingested.", ())
AGENT_REJECTED = MetricSpec("gradwatch_agent_records_rejected_total", "counter",
                            "Spool record lines rejected, by reason: malformed (not JSON), invalid (a required field wrong), "
                            "oversize (a line over 8 MiB), truncated (the process ended mid-line), unprocessable (a "
                            "record the agent could not apply).", ("reason",))
AGENT_INGEST_LAG = MetricSpec("gradwatch_agent_ingest_lag_seconds", "gauge",
                              "Seconds between the newest ingested record being written and being ingested.", ())
AGENT_RESCANS = MetricSpec("gradwatch_agent_rescans_total", "counter",
                           "Full rescans of the spool (periodic, in case file events were missed).", ())
AGENT_SCRAPE_DURATION = MetricSpec("gradwatch_agent_scrape_duration_seconds", "gauge",
                                   "Time taken to build this scrape's metrics.", ())
AGENT_CHECKPOINT_DURATION = MetricSpec("gradwatch_agent_checkpoint_duration_seconds", "gauge",
                                       "Time the last periodic checkpoint of the agent's state took to save.", ())
AGENT_CHECKPOINT_BYTES = MetricSpec("gradwatch_agent_checkpoint_bytes", "gauge",
                                    "Size of the agent's last checkpoint (agent/state.json).", ())
AGENT_HANDLER_ERRORS = MetricSpec("gradwatch_agent_handler_errors_total", "counter",
                                  "Errors caught in file-event handlers and ingestion (logged, never fatal).", ())
AGENT_WATCHER_UP = MetricSpec("gradwatch_agent_watcher_up", "gauge",
                              "1 while the file watcher thread is alive, else 0 (it is restarted).", ())
AGENT_WATCHER_RESTARTS = MetricSpec("gradwatch_agent_watcher_restarts_total", "counter",
                                    "Times the file watcher died and was restarted.", ())
AGENT_RUNS = MetricSpec("gradwatch_agent_runs", "gauge", "Runs the agent exports, by state.", ("state",))
AGENT_RUNS_REJECTED = MetricSpec("gradwatch_agent_runs_rejected", "gauge",
                                 "Runs whose metadata the agent refused (e.g. newer spool format); see the agent log.", ())
AGENT_RUN_FAULTS = MetricSpec(
    "gradwatch_agent_run_faults_total", "counter",
    "Failures of the agent's per-run steps, by stage: ingest (reading the run's files; retried with backoff), stuck "
    "(a records file ending mid-line for 30 s while its process lives), rules (a rule failed on the run's values and "
    "was disabled for it), refresh, alerts, collect. The other runs are not affected; the agent log names the run "
    "once per episode, /api/runs shows its faults.", ("stage",))
AGENT_RUNS_FAULTY = MetricSpec("gradwatch_agent_runs_faulty", "gauge",
                               "Runs with an open fault now, by stage (see gradwatch_agent_run_faults_total).",
                               ("stage",))
AGENT_RULES_RELOADS = MetricSpec("gradwatch_agent_rules_reloads_total", "counter",
                                 "Reloads of the rules file, by result (ok, rejected: the previous rules stay).",
                                 ("result",))
AGENT_ALERTS_FIRING = MetricSpec("gradwatch_agent_alerts_firing", "gauge",
                                 "Step-resolution alerts the agent has firing now, by severity (docs/alerts.md).",
                                 ("severity",))
AGENT_NOTIFICATIONS = MetricSpec(
    "gradwatch_agent_notifications_total", "counter",
    "Alerts and annotations by endpoint (alertmanager, webhook, grafana) and result: delivered, expired (given up "
    "after alert_retry_seconds of retries), dropped (queue full).", ("endpoint", "result"))
AGENT_NOTIFICATION_FAILURES = MetricSpec(
    "gradwatch_agent_notification_failures_total", "counter",
    "Failed delivery attempts by endpoint (each is retried with backoff).", ("endpoint",))
AGENT_NOTIFICATIONS_PENDING = MetricSpec("gradwatch_agent_notifications_pending", "gauge",
                                         "Notifications waiting to be delivered (or retried), by endpoint.",
                                         ("endpoint",))
AGENT_GPUS = MetricSpec("gradwatch_agent_gpus", "gauge",
                        "GPUs the agent's NVML collector sees (0: no NVML or no GPU; the reason is in /healthz).", ())
AGENT_GPU_READING_AGE = MetricSpec("gradwatch_agent_gpu_reading_age_seconds", "gauge",
                                   "Age of the GPU series served (NVML is read once a second on a thread of its own; "
                                   "past 10 s they are left out: NVML stopped answering). Absent without GPUs.", ())
AGENT_BUILD_INFO = MetricSpec("gradwatch_agent_build_info", "gauge", "gradwatch version of the agent (value 1).",
                              ("version",))

ALL: tuple[MetricSpec, ...] = tuple(v for v in list(globals().values()) if isinstance(v, MetricSpec))


def markdown_table() -> str:
    """The catalogue as the Markdown table in docs/metrics.md (``python -m gradwatch.agent.catalogue``)."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for spec in ALL:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        rows.append(f"| `{spec.name}` | {spec.kind} | {labels} | {spec.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
