"""The ``gradwatch`` command line: run, agent, status, demo, rules, dashboards."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from gradwatch import __version__
from gradwatch.errors import GradwatchError

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="gradwatch")
def cli() -> None:
    """Watch PyTorch training runs and export them to Prometheus.

    \b
    Unchanged script:         gradwatch run -- python train.py
    In the training script:   probe = gradwatch.attach(model, optimizer)
    On each machine:          gradwatch agent    (started for you if none runs)
    See what runs:            gradwatch status
    Follow one:               gradwatch tail RUN
    A run's history:          gradwatch export RUN -o run.csv
    Its plots:                gradwatch report RUN -o run.html
    What went wrong:          gradwatch inspect RUN
    Clean the spool:          gradwatch runs prune --older-than 30d
    Check a rules file:       gradwatch rules check rules.yaml
    Try it:                   gradwatch demo
    """


_home_option = click.option(
    "--home", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Spool directory shared by probes and agent. [env: GRADWATCH_HOME; default: ~/.local/share/gradwatch]",
)


@cli.command(context_settings=_CONTEXT)
@_home_option
@click.option("--host", default=None, metavar="ADDRESS", help="Address to listen on. [env: GRADWATCH_HOST; default: 127.0.0.1]")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port for /metrics. [env: GRADWATCH_PORT; default: 9478]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML file with agent settings. [env: GRADWATCH_CONFIG]")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML rules file, reloaded when it changes. [env: GRADWATCH_RULES_FILE; default: packaged rules]")
@click.option("--stall-after", "stall_after_seconds", type=float, default=None, metavar="SECONDS",
              help="Seconds without a record before a run counts as stalled. [default: 120]")
@click.option("--ended-ttl", "ended_ttl_seconds", type=float, default=None, metavar="SECONDS",
              help="Seconds a finished or crashed run stays exported. [default: 900]")
@click.option("--exit-when-idle", "exit_when_idle_seconds", type=float, default=None, metavar="SECONDS",
              help="Exit after this many seconds with no running run. [default: never]")
@click.option("--alertmanager-url", "alertmanager_url", default=None, metavar="URL",
              help="Send step-resolution alerts to this Alertmanager (API v2). [env: GRADWATCH_ALERTMANAGER_URL]")
@click.option("--alertmanager-url-file", "alertmanager_url_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="Read the Alertmanager URL from FILE (one with credentials in it). [env: GRADWATCH_ALERTMANAGER_URL_FILE]")
@click.option("--webhook-url", "webhook_url", default=None, metavar="URL",
              help="Also POST alerts to this webhook. Visible to every user in `ps`: prefer --webhook-url-file or "
                   "GRADWATCH_WEBHOOK_URL for a URL whose path is its secret (Slack's). [env: GRADWATCH_WEBHOOK_URL]")
@click.option("--webhook-url-file", "webhook_url_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="Read the webhook URL from FILE. [env: GRADWATCH_WEBHOOK_URL_FILE]")
@click.option("--webhook-format", "webhook_format", type=click.Choice(["alertmanager", "slack"]), default=None,
              help="Webhook payload: Alertmanager's webhook JSON or a Slack message. [default: alertmanager]")
@click.option("--grafana-url", "grafana_url", default=None, metavar="URL",
              help="Annotate actions and alerts in this Grafana; the token comes from GRADWATCH_GRAFANA_TOKEN, "
                   "--grafana-token-file or the config file, never from the command line. [env: GRADWATCH_GRAFANA_URL]")
@click.option("--grafana-token-file", "grafana_token_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE", help="Read the Grafana token from FILE. [env: GRADWATCH_GRAFANA_TOKEN_FILE]")
@click.option("--if-not-running", is_flag=True, help="Exit quietly (status 0) if an agent already serves the spool.")
@click.option("--port-fallback", is_flag=True,
              help="If the port is taken, listen on a free one instead and say so (clients find it through "
                   "the spool). What an agent started by a probe does.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def agent(home: Path | None, config_file: Path | None, if_not_running: bool, port_fallback: bool, log_level: str,
          **settings: Any) -> None:
    """Run the agent: ingest every run in the spool, serve /metrics, /healthz and /api/runs.

    Settings come from defaults, then --config, then GRADWATCH_<SETTING> environment
    variables, then these options.
    """
    from gradwatch.agent.daemon import Agent, AgentAlreadyRunning
    from gradwatch.agent.settings import load_agent_config

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # watchdog logs every inotify event at debug level: with the log file beside the watched rules file, each line
    # it writes would be one more event to log, a core spinning forever
    logging.getLogger("watchdog").setLevel(max(logging.INFO, logging.getLogger().level))
    flags = {p.name: p.opts[0] for p in click.get_current_context().command.params if p.name and p.opts}
    config = load_agent_config(cli={"home": home, **settings}, config_file=config_file, cli_flags=flags)
    from gradwatch.agent.redact import redact_url

    for name in ("webhook_url", "alertmanager_url"):
        url = settings.get(name)
        if url and redact_url(str(url)) != str(url):  # a path, query or credentials: what makes it a secret
            logging.getLogger("gradwatch.agent").warning(
                "--%s is visible to every user of this machine (ps); put the URL in a file (--%s-file) or in "
                "GRADWATCH_%s instead", name.replace("_", "-"), name.replace("_", "-"), name.upper())
    try:
        daemon = Agent(config, port_fallback=port_fallback)
        daemon.serve_forever()
    except AgentAlreadyRunning:
        if if_not_running:
            return
        raise


def _batch_size(ctx: click.Context, param: click.Parameter, value: str) -> str:
    text = value.strip().lower()
    if text in ("auto", "off") or (text.isdigit() and int(text) > 0):
        return text
    raise click.BadParameter(f"{value!r}: expected auto, off or a positive number of samples")


@cli.command("run", context_settings={**_CONTEXT, "allow_interspersed_args": False})
@click.option("--run", "run_name", default=None, metavar="NAME",
              help="Run name (label `run`). [default: <script>-<6 hex>]")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rules file for this run (checked before the command starts). [default: the agent's rules]")
@_home_option
@click.option("--on-stop", type=click.Choice(["raise", "flag"]), default="raise", show_default=True,
              help="When a rule stops the run: raise gradwatch.StopTraining from optimizer.step() (ends an "
                   "unmodified script with exit status 0), or only set the probe's flag.")
@click.option("--batch-size", default="auto", show_default=True, metavar="auto|off|N", callback=_batch_size,
              help="Samples per training forward pass, for samples/s: auto reads it from the model's first "
                   "input tensor (docs/attaching.md), N fixes it, off records none.")
@click.option("--batch-dim", type=click.IntRange(min=0), default=None, metavar="DIM",
              help="The dimension of the model's input that is the batch. [default: 0, or 1 for models whose "
                   "RNN/Transformer layers are not batch_first]")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing of our own.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]...")
def run_cmd(run_name: str | None, rules_file: Path | None, home: Path | None, on_stop: str, batch_size: str,
            batch_dim: int | None, quiet: bool, command: tuple[str, ...]) -> None:
    """Run a training command, unmodified, with gradwatch watching it.

    \b
      gradwatch run -- python train.py --lr 3e-4
      gradwatch run --run sweep-7 --rules rules.yaml -- torchrun --nproc-per-node 8 train.py

    Every optimizer the script steps is found through torch's optimizer hooks (without one,
    each backward pass is a step); the loss is the scalar its backward pass starts from; a
    clip_grad_norm_ result is reused (the norm before clipping), AMP's GradScaler is undone for
    the norm and the steps it skips are recorded; samples come from the model's input.
    gradwatch.log(val_loss=...) in the script records other scalars. Rank and world size come
    from torchrun's environment.
    A stop decision raises gradwatch.StopTraining (a SystemExit with status 0) from
    optimizer.step(): catch it to save a checkpoint. The command's exit status is passed through.
    """
    from gradwatch.launch import CommandNotFound, launch

    try:
        code = launch(command, run=run_name, rules=rules_file, home=home, on_stop=on_stop, quiet=quiet,
                      batch_size=batch_size, batch_dim=batch_dim)
    except CommandNotFound as exc:
        click.echo(f"gradwatch: error: {exc}", err=True)
        code = 127  # what a shell answers
    sys.exit(code)


@cli.command(context_settings=_CONTEXT)
@_home_option
@click.option("--url", default=None, help="Agent URL. [default: the agent serving --home, else read the spool]")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.option("--show", "show", multiple=True, metavar="NAME",
              help="A logged scalar as a column of its own (val_loss, accuracy); repeat for more.")
@click.option("--watch", "watch", is_flag=True, help="Redraw the table in place until Ctrl-C.")
@click.option("--every", default=2.0, show_default=True, type=click.FloatRange(min=0.2),
              help="Seconds between redraws, with --watch.")
def status(home: Path | None, url: str | None, as_json: bool, show: tuple[str, ...], watch: bool,
           every: float) -> None:
    """Show a table of runs: state, steps, loss, gradient norm, learning rate, throughput."""
    from gradwatch.status import fetch_runs, print_runs, watch_runs

    if watch:
        watch_runs(home, url, every, show)
        return
    runs, source = fetch_runs(home=home, url=url)
    if as_json:
        import json

        click.echo(json.dumps({"source": source, "runs": runs}, indent=1, default=str))
    else:
        print_runs(runs, source, show)


@cli.command(context_settings=_CONTEXT)
@_home_option
@click.option("--steps", default=1000, show_default=True, type=click.IntRange(min=200),
              help="Optimizer steps to run (at least 200, so the model is trained before the unstable phase).")
@click.option("--steps-per-second", default=20.0, show_default=True, type=click.FloatRange(min=0),
              help="Pace of training so it can be watched (0: as fast as possible).")
@click.option("--no-live", is_flag=True, help="Plain progress lines instead of a live table (for logs).")
def demo(home: Path | None, steps: int, steps_per_second: float, no_live: bool) -> None:
    """Train a small model on CPU through an unstable phase while gradwatch watches it.

    About a minute with the defaults. The agent is started for you if none runs; its
    metrics stay available afterwards at the printed URL.
    """
    from gradwatch.demo import run_demo

    run_demo(home=home, steps=steps, steps_per_second=steps_per_second, live=not no_live)


@cli.command(context_settings=_CONTEXT)
@click.argument("run")
@_home_option
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet", "tensorboard"]), default="csv",
              show_default=True, help="csv / jsonl / parquet: one table (a row per step, logged scalar, action, "
              "decision; jsonl adds per-layer statistics); tensorboard: event files, one directory per rank.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="File (directory for tensorboard); '-' for standard output (csv, jsonl). "
              "[default: RUN.FORMAT, RUN-tensorboard/]")
def export(run: str, home: Path | None, fmt: str, output: Path | None) -> None:
    """Export everything recorded of RUN, from the spool (no agent needed).

    \b
    gradwatch export lr-sweep-3 -o sweep.csv
    gradwatch export lr-sweep-3 --format tensorboard && tensorboard --logdir lr-sweep-3-tensorboard
    """
    from gradwatch.export import write
    from gradwatch.history import read_run

    history = read_run(run, home)
    for name, why in history.unreadable.items():
        click.echo(f"gradwatch: {name} left out: {why}", err=True)
    where = write(history, fmt, output, progress=lambda message: click.echo(message, err=True))
    if where is not None:
        steps = sum(len(r.steps) for r in history.ranks.values())
        click.echo(f"{run}: {steps} steps of {len(history.ranks)} rank(s) -> {where}", err=True)


@cli.command(context_settings=_CONTEXT)
@click.argument("run")
@_home_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="FILE.html (one self-contained page, opens offline) or FILE.png. [default: RUN.html]")
@click.option("--rank", default=0, show_default=True, type=click.IntRange(min=0), help="Which rank to draw.")
def report(run: str, home: Path | None, output: Path | None, rank: int) -> None:
    """Plot RUN from the spool: loss, gradient norm and clip threshold, LR, step time and data wait, memory,
    per-layer gradient norms; actions, decisions, skips and non-finite origins marked at their steps."""
    from gradwatch.history import read_run
    from gradwatch.report import write as write_report

    history = read_run(run, home)
    where = write_report(history, output or Path(f"{run}.html"), rank)
    click.echo(f"{run}: report -> {where}", err=True)


@cli.command(context_settings=_CONTEXT)
@click.argument("names", nargs=-1, required=True, metavar="RUN RUN...")
@_home_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("compare.html"),
              show_default=True, help="FILE.html (one self-contained page) or FILE.png.")
@click.option("--rank", default=0, show_default=True, type=click.IntRange(min=0), help="Which rank of each run.")
def compare(names: tuple[str, ...], home: Path | None, output: Path, rank: int) -> None:
    """Key curves of several runs on one step axis: loss, val_loss, gradient norm, LR, step time."""
    from gradwatch.history import read_run
    from gradwatch.report import write_comparison

    if len(names) < 2:
        raise click.UsageError("give two runs or more to compare")
    where = write_comparison([read_run(name, home) for name in names], output, rank)
    click.echo(f"{len(names)} runs: comparison -> {where}", err=True)


@cli.command(context_settings=_CONTEXT)
@click.argument("run")
@_home_option
@click.option("--timeout", default=3.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds to wait for each rank's dump.")
@click.option("--full", is_flag=True, help="Every frame, and the other threads of each rank.")
def stacks(run: str, home: Path | None, timeout: float, full: bool) -> None:
    """Where each rank of RUN on this machine is now: the Python stack of its training thread, ranks at the same
    place grouped, the odd one out first. The probe writes its threads' stacks into the spool when asked (a signal;
    training goes on); ranks on other machines are named, not asked: run this there."""
    from gradwatch.stacks import collect, report

    for line in report(run, collect(run, home, timeout), full=full):
        click.echo(line)


@cli.command(context_settings=_CONTEXT)
@click.argument("run")
@_home_option
@click.option("--rank", default=None, type=click.IntRange(min=0), help="Only this rank. [default: every rank]")
@click.option("-n", "--lines", "last", default=10, show_default=True, type=click.IntRange(min=0),
              help="Steps to show from before now.")
@click.option("--no-follow", is_flag=True, help="Print the last steps and exit instead of following the run.")
def tail(run: str, home: Path | None, rank: int | None, last: int, no_follow: bool) -> None:
    """Follow RUN as it trains, from the spool: a line per step (loss, grad norm, LR, step time, logged scalars)
    and one per event (actions, skipped updates, non-finite origins, spikes, resumes, the end), until it ends or
    Ctrl-C. A run faster than a terminal can show (over 20 new steps of a rank in a quarter second) prints the newest
    step of each rank per quarter second."""
    from gradwatch.tail import RunTail, follow

    try:
        follow(RunTail(run, home, rank, last), click.echo, keep_following=not no_follow)
    except KeyboardInterrupt:
        return


@cli.command(context_settings=_CONTEXT)
@click.argument("run")
@_home_option
@click.option("--rank", default=0, show_default=True, type=click.IntRange(min=0), help="Which rank to look at.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def inspect(run: str, home: Path | None, rank: int, as_json: bool) -> None:
    """Diagnose RUN from the spool: non-finite steps and where they came from, spikes, dead, exploding and
    vanishing layers, odd update ratios, an input-bound loop, a plateau, a clip that clips every step; each
    with its steps and what to try."""
    from gradwatch.diagnosis import diagnose
    from gradwatch.history import read_run
    from gradwatch.offline_rules import replay

    history = read_run(run, home)
    findings = diagnose(history, rank)
    firings = replay(history.rank(rank))
    if as_json:
        import json

        click.echo(json.dumps({"run": run, "rank": rank, "findings": [f.to_json() for f in findings],
                               "catalogue": [{"rule": d.rule, "step": d.step, "reason": d.reason,
                                              "layer": d.details.get("layer"), "evidence": d.details.get("evidence")}
                                             for d in firings]}, indent=1, default=str))
        return
    steps = history.rank(rank).steps
    click.echo(f"run {run} ({history.status}, {steps[-1].step if steps else 0} steps, rank {rank})")
    if not findings and not firings:
        click.echo("nothing stands out: no non-finite step, spike, layer problem, input stall, plateau or "
                   "constant clipping, and no rule of the catalogue fired")
    for finding in findings:
        click.echo(f"{finding.severity:<8} {finding.steps}: {finding.what}")
        for line in finding.details:
            click.echo(f"{'':<8} {line}")
        click.echo(f"{'':<8} try: {finding.advice}")
    if firings:
        click.echo(f"the catalogue (SageMaker Debugger's rules, as the agent runs them: docs/rules.md), {len(firings)} "
                   "firing(s):")
        for d in firings[:50]:
            click.echo(f"  {d.details.get('evidence') or f'{d.rule} at step {d.step} ({d.reason})'}")
        if len(firings) > 50:
            click.echo(f"  ... and {len(firings) - 50} more (--json lists them all)")


@cli.group(context_settings=_CONTEXT)
def runs() -> None:
    """List the spool's runs and remove old ones (the spool grows ~200 bytes per step and rank)."""


@runs.command("ls", context_settings=_CONTEXT)
@_home_option
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
def runs_ls(home: Path | None, as_json: bool) -> None:
    """Every run in the spool: status, ranks, steps, last record, size on disk."""
    from gradwatch.retention import print_runs_list, runs_list

    listing = runs_list(home)
    if as_json:
        import json

        click.echo(json.dumps(listing, indent=1))
    else:
        print_runs_list(listing)


@runs.command("rm", context_settings=_CONTEXT)
@click.argument("names", nargs=-1, required=True, metavar="RUN...")
@_home_option
@click.option("--force", is_flag=True, help="Remove a run that is still running too.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def runs_rm(names: tuple[str, ...], home: Path | None, force: bool, yes: bool) -> None:
    """Remove runs from the spool (their records, metadata and the agent's events)."""
    from gradwatch.retention import remove_runs

    remove_runs(list(names), home, force=force, confirm=None if yes else _confirm, echo=click.echo)


@runs.command("prune", context_settings=_CONTEXT)
@_home_option
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="Remove ended runs whose last record is older than AGE: 30d, 12h, 90m, 2w.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def runs_prune(home: Path | None, older_than: str, dry_run: bool, yes: bool) -> None:
    """Remove ended runs older than AGE (a run without an end record whose process lives is kept)."""
    from gradwatch.retention import parse_age, prune_runs

    prune_runs(home, parse_age(older_than), dry_run=dry_run, confirm=None if yes else _confirm, echo=click.echo)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise GradwatchError(f"{question} needs confirmation; run again with --yes (standard input is not a terminal)")
    return click.confirm(question, default=False)


@cli.group(context_settings=_CONTEXT)
def rules() -> None:
    """Check rules files and show the defaults (docs/rules.md explains every field)."""


@rules.command("check", context_settings=_CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_home_option
@click.option("--url", default=None, metavar="URL", help="Ask this agent which metrics its runs record. "
              "[default: the agent serving the spool, else the spool itself]")
def rules_check(file: Path, home: Path | None, url: str | None) -> None:
    """Validate a rules file and list what it does; exit status 2 with the error when it is invalid.

    A rule on a metric that is neither built in nor recorded by any run of the spool gets a warning
    (a typo such as val_los would never fire)."""
    from rich.table import Table

    from gradwatch.agent.links import alert_name
    from gradwatch.rules import load_rules
    from gradwatch.status import make_console

    config = load_rules(file)
    console = make_console()
    for warning in _unknown_metric_warnings(config, home, url):
        console.print(f"[yellow]warning[/]: {warning}", soft_wrap=True)
    table = Table(title=f"{file}: {len(config.rules)} rule(s)" + (" [bold yellow](dry run)[/]" if config.dry_run else ""),
                  title_justify="left", header_style="bold")
    for column in ("rule", "metric", "detector", "action", "mode", "bounds", "alert"):
        table.add_column(column)
    for rule in config.rules:
        bounds = ", ".join(b for b in (f"max {rule.max_actions}" if rule.max_actions else "",
                                       f"cooldown {rule.cooldown_steps} steps" if rule.cooldown_steps else "") if b)
        mode = "act" if config.acting(rule) else ("dry run" if rule.mode == "act" else "observe")
        alert = "-" if rule.alert == "none" else f"{alert_name(rule.name)} ({rule.alert})"
        table.add_row(rule.name, rule.metric, rule.detect.type, rule.action.type, mode, bounds or "-", alert)
    console.print(table)
    g = config.guards
    console.print(f"guards: skip on non-finite {g.skip.on_nonfinite}, on spike {g.skip.on_spike}; "
                  f"clip {g.clip.scheme}" + (f" ({g.clip.mode})" if g.clip.scheme != "none" else "")
                  + (f"; snapshots every {g.snapshots.every} steps, keep {g.snapshots.keep}"
                     if config.snapshots_enabled else ""))


def _unknown_metric_warnings(config: Any, home: Path | None, url: str | None) -> list[str]:
    import difflib

    from gradwatch.rules.config import BUILT_IN_METRICS, CONVENTIONAL_METRICS
    from gradwatch.status import fetch_runs

    known = set(BUILT_IN_METRICS) | set(CONVENTIONAL_METRICS)
    unknown = [rule for rule in config.rules if rule.metric not in known]
    if not unknown:
        return []
    try:
        runs, source = fetch_runs(home, url)
    except Exception as exc:  # no spool yet, an agent that went away: check against the built-in names only
        runs, source = [], f"no runs ({exc})"
    seen = {name for run in runs for rank in run.get("ranks", []) for name in (rank.get("metrics") or {})}
    out = []
    for rule in unknown:
        if rule.metric in seen:
            continue
        close = difflib.get_close_matches(rule.metric, sorted(known | seen), n=1)
        out.append(f"rule {rule.name} watches metric {rule.metric!r}, which is not built in and no run has recorded "
                   f"({source}); it fires only once a run logs it" + (f". Did you mean {close[0]!r}?" if close else
                                                                      f". Built in: {', '.join(BUILT_IN_METRICS)}"))
    return out


@rules.command("defaults", context_settings=_CONTEXT)
def rules_defaults() -> None:
    """Print the packaged default rules file (a starting point for your own)."""
    from importlib import resources

    click.echo(resources.files("gradwatch.rules").joinpath("default_rules.yaml").read_text(encoding="utf-8"), nl=False)


@cli.group(context_settings=_CONTEXT)
def dashboards() -> None:
    """The Grafana dashboards gradwatch ships: run, fleet and debug (dashboards/README.md)."""


@dashboards.command("export", context_settings=_CONTEXT)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def dashboards_export(directory: Path) -> None:
    """Write the dashboards as JSON files into DIRECTORY (for Grafana's file provisioning)."""
    from gradwatch.dashboards.publish import export

    for path in export(directory):
        click.echo(f"wrote {path}")


@dashboards.command("push", context_settings=_CONTEXT)
@click.option("--url", required=True, envvar="GRADWATCH_GRAFANA_URL", show_envvar=True,
              help="Grafana to upload to, e.g. http://127.0.0.1:3000.")
@click.option("--token", envvar="GRADWATCH_GRAFANA_TOKEN", show_envvar=True,
              help="Service-account token (Editor role). Prefer the environment variable: options show in `ps`.")
@click.option("--folder", default="gradwatch", show_default=True, help="Folder to put the dashboards in.")
def dashboards_push(url: str, token: str | None, folder: str) -> None:
    """Create or update the dashboards in an existing Grafana (safe to repeat: unchanged ones are left alone).

    The dashboards ask for a Prometheus data source (variable "Data source") that scrapes the agent.
    """
    from gradwatch.dashboards.publish import push

    push(url, token, folder, progress=lambda r: click.echo(f"{r.outcome:9} {r.name:6} {r.url}"))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr, never a traceback."""
    try:
        cli.main(args=argv, prog_name="gradwatch", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except GradwatchError as exc:
        click.echo(f"gradwatch: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("GRADWATCH_DEBUG"):
            raise
        click.echo(f"gradwatch: internal error: {exc!r} (set GRADWATCH_DEBUG=1 to see the traceback)", err=True)
        sys.exit(1)
