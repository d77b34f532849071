"""``gradwatch status`` at the widths people's terminals have: run, state, steps, loss, grad norm and lr always
show (a long run name cut with an ellipsis, never to nothing); the other columns follow while they fit."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from gradwatch.status import runs_table

NAME = "gpt2-medium-lr3e-4-warmup2000-seed17"


def _runs() -> list[dict[str, Any]]:
    return [{"run": NAME, "status": "running", "ranks": [
        {"rank": r, "status": "running", "steps": 12345, "loss": 2.71828, "grad_norm": 0.612, "learning_rates": [3e-4],
         "step_duration_seconds": 0.2345, "samples_per_second": 512.3, "actions": {"reduce_lr:spike": 2},
         "clip_threshold": 1.0, "clipped_fraction": 0.08, "seconds_since_last_record": 3.0} for r in range(2)]}]


def _render(width: int | None, console_width: int) -> list[str]:
    console = Console(width=console_width, record=True, color_system=None)
    console.print(runs_table(_runs(), "gradwatch runs", width=width))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_essential_columns_show_in_full_at_every_width(width: int) -> None:
    lines = _render(width, width)
    assert all(len(line.rstrip()) <= width for line in lines)
    body = "\n".join(lines)
    for text in ("running", "12345", "2.718", "0.612", "0.0003", "gpt2-medium-lr3e-4"):
        assert text in body, (width, text)


def test_wider_terminals_get_more_columns() -> None:
    narrow, wide = "\n".join(_render(80, 80)), "\n".join(_render(120, 120))
    assert "step time" not in narrow and "234.5 ms" in wide and "last record" in wide
    everything = "\n".join(_render(None, 220))  # not a terminal (a pipe, a log): every column
    assert NAME in everything and "lr cut x2" in everything and "512.3" in everything


def test_show_adds_a_logged_scalar_column() -> None:
    runs = _runs()
    runs[0]["ranks"][0]["metrics"] = {"val_loss": 0.4321}
    console = Console(width=120, record=True, color_system=None)
    console.print(runs_table(runs, "gradwatch runs", width=120, show=["val_loss"]))
    text = console.export_text()
    assert "val_loss" in text and "0.4321" in text


def test_watch_redraws_until_interrupted(tmp_path: Any) -> None:
    """Without a terminal (a log) --watch prints one table per interval; Ctrl-C ends it quietly."""
    import os
    import signal
    import subprocess
    import sys

    from tests.agent.helpers import SpoolBuilder

    spool = SpoolBuilder(tmp_path)
    spool.start("watched")
    spool.steps("watched", 0, 1, 5)
    process = subprocess.Popen([sys.executable, "-m", "gradwatch", "status", "--watch", "--every", "0.2", "--home",
                                str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "GRADWATCH_AUTOSTART": "0"})
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if sum("gradwatch runs (spool" in seen for seen in lines) >= 3:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "Traceback" not in err
    assert sum("watched" in line for line in lines) >= 2
