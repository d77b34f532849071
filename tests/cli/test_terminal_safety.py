"""`gradwatch status` prints what the spool holds; what a hostile or broken writer put there cannot drive
the terminal: escape sequences in run names, metric names and errors are shown escaped, rich markup as text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gradwatch.spool.format import SpoolLayout
from gradwatch.terminal import safe_text
from tests.agent.helpers import SpoolBuilder

HOSTILE_RUN = "evil\x1b]0;owned\x07\u202ename"


def test_control_characters_and_markup_are_escaped() -> None:
    assert safe_text("a\x1b[2Jb\x07c\u202ed") == "a\\x1b[2Jb\\x07c\\u202ed"
    assert safe_text("[red]loud[/red]") == "\\[red]loud\\[/red]"


def test_gradwatch_status_never_prints_an_escape_sequence_from_the_spool(tmp_path: Path) -> None:
    spool = SpoolBuilder(tmp_path)
    run_dir = spool.start(HOSTILE_RUN)
    spool.steps(HOSTILE_RUN, 0, 1, 3)
    spool.append(HOSTILE_RUN, 0, {"kind": "end", "step": 3, "t": 1_000_001.0, "status": "failed",
                                  "error": "RuntimeError('\x1b[31m[bold]boom[/bold]\x1b[0m')"})
    assert SpoolLayout.meta_file(run_dir, 0).exists()
    meta = json.loads(SpoolLayout.meta_file(run_dir, 0).read_text())
    assert meta["run"] == HOSTILE_RUN
    done = subprocess.run([sys.executable, "-m", "gradwatch", "status", "--home", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\u202e" not in done.stdout
    assert "evil\\x1b]0;owned\\x07\\u202ename" in done.stdout
