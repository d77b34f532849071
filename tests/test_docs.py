"""Docs that must stay true: the metric table, the default port, the README's two commands."""

from __future__ import annotations

from pathlib import Path

from gradwatch.agent.catalogue import markdown_table
from gradwatch.agent.settings import DEFAULT_PORT

ROOT = Path(__file__).resolve().parent.parent


def test_metrics_doc_matches_the_catalogue() -> None:
    assert markdown_table() in (ROOT / "docs" / "metrics.md").read_text(), \
        "regenerate the table: python -m gradwatch.agent.catalogue"


def test_readme_has_the_two_commands_and_the_default_port() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert f"127.0.0.1:{DEFAULT_PORT}" in readme and ":9400" not in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_no_doc_or_config_uses_the_dcgm_port() -> None:
    for path in [*ROOT.glob("docs/*.md"), ROOT / "docker-compose.yml", *ROOT.glob("deploy/**/*.yml")]:
        text = path.read_text()
        assert ":9400" not in text, f"{path}: 9400 is the DCGM exporter's port; gradwatch uses {DEFAULT_PORT}"


def test_rules_doc_covers_every_detector_action_guard_scheme_and_shipped_rule() -> None:
    from typing import get_args

    from gradwatch.rules import config as cfg

    doc = (ROOT / "docs" / "rules.md").read_text()
    detectors = [get_args(m.model_fields["type"].annotation)[0] for m in
                 (cfg.NonFinite, cfg.Spike, cfg.Divergence, cfg.Plateau, cfg.EarlyStopping, cfg.Threshold)]
    actions = [get_args(m.model_fields["type"].annotation)[0] for m in (cfg.Stop, cfg.ReduceLR, cfg.ScaleClip,
                                                                       cfg.Rewind)]
    for name in [*detectors, *actions]:
        assert f"| `{name}` |" in doc, f"docs/rules.md has no row for {name}"
    for scheme in get_args(cfg.ClipGuard.model_fields["scheme"].annotation):
        assert scheme in doc
    for rule in cfg.default_rules().rules:
        assert f"| `{rule.name}` |" in doc, f"docs/rules.md does not list the shipped rule {rule.name}"
