"""``gradwatch report``: a recorded run drawn from the spool alone. The figure is checked for what it shows (the
recorded numbers in its lines, the marks at their steps, the layer heat map), the PNG for being a picture of it,
and the HTML page for opening offline with the list of what happened."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib.image
import pytest

import gradwatch
from gradwatch.cli import main
from gradwatch.report import figure
from tests.probe.test_nonfinite_origin import BAD_FROM, ForwardNaN, _train


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose layer 2 goes NaN from step 10 (the guards skip those updates), per-layer statistics every 5."""
    home = tmp_path_factory.mktemp("spool")
    os.environ.setdefault("GRADWATCH_LAYER_STATS_EVERY", "5")
    try:
        _train(home, ForwardNaN(), steps=40, run="broken")
        _train(home, None, steps=40, run="healthy")
    finally:
        os.environ.pop("GRADWATCH_LAYER_STATS_EVERY", None)
    return home


def test_the_figure_draws_the_recorded_numbers_and_marks_what_happened(home: Path) -> None:
    run = gradwatch.read_run("broken", home)
    fig = figure(run)
    labels = [axis.get_ylabel() for axis in fig.axes if axis.get_ylabel() != "log10 grad norm"]
    assert labels == ["logged", "grad norm", "learning rate", "ms", "layer", "steps/s"]
    [rate] = next(axis for axis in fig.axes if axis.get_ylabel() == "steps/s").get_lines()
    durations = [s.dur for s in run.rank(0).steps]
    assert all(math.isclose(r, 1 / d) for r, d in zip(rate.get_ydata(), durations, strict=True) if d)
    grad_axis = fig.axes[1]
    [norm_line] = [line for line in grad_axis.get_lines() if line.get_label() == "gradient norm"]
    recorded = [s.grad_norm for s in run.rank(0).steps]
    drawn = list(norm_line.get_ydata())
    assert [d for d, r in zip(drawn, recorded, strict=True) if math.isfinite(r)] == [r for r in recorded if math.isfinite(r)]
    nonfinite_marks = [line.get_xdata()[0] for line in grad_axis.get_lines() if line.get_gid() == "mark-nonfinite"]
    assert BAD_FROM in nonfinite_marks  # the step the gradients were named at
    [skipped] = [patch for patch in grad_axis.patches if patch.get_gid() == "mark-skip"]  # one stretch
    left, right = skipped.get_x(), skipped.get_x() + skipped.get_width()
    assert (left, right) == (BAD_FROM - 0.5, 40.5)  # every update the guard skipped
    assert grad_axis.get_xlim() == (0.5, 40.5)
    heat = fig.axes[4].get_images()[0].get_array()
    assert heat.shape == (3, 8)  # three layers with parameters, eight sampled steps


def test_a_healthy_run_has_no_marks(home: Path) -> None:
    fig = figure(gradwatch.read_run("healthy", home))
    artists = [a for axis in fig.axes for a in [*axis.get_lines(), *axis.patches]]
    assert not [a for a in artists if (a.get_gid() or "").startswith("mark-")]


def test_the_png_is_a_picture_of_the_figure(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["report", "broken", "--home", str(home), "-o", str(tmp_path / "r.png")])
    assert "report ->" in capsys.readouterr().err
    image = matplotlib.image.imread(tmp_path / "r.png")
    height, width = image.shape[:2]
    assert width > 1000 and height > 1000
    assert image[..., :3].std() > 0.05  # lines and a heat map, not a blank page


def test_the_html_page_opens_offline_and_lists_what_happened(home: Path, tmp_path: Path) -> None:
    main(["report", "broken", "--home", str(home), "-o", str(tmp_path / "r.html")])
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "gradwatch run broken" in page
    assert 'src="http' not in page and 'href="http' not in page and "<script" not in page  # nothing fetched
    assert f"step {BAD_FROM}: gradients non-finite (nan) in 6 parameter(s)" in page
    assert "first non-finite forward output in `2` (nan)" in page
    assert f"update skipped (nonfinite), steps {BAD_FROM}-40" in page


def test_bad_requests_are_one_clear_line(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["report", "broken", "--home", str(home), "-o", str(tmp_path / "r.pdf")])
    assert "give a file ending in .html or .png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "broken", "--home", str(home), "--rank", "3"])
    assert "has no rank 3" in capsys.readouterr().err


def test_compare_draws_each_runs_curves_on_one_axis(home: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from gradwatch.report import comparison

    runs = [gradwatch.read_run(name, home) for name in ("broken", "healthy")]
    fig = comparison(runs)
    loss_axis = fig.axes[0]
    assert [line.get_label() for line in loss_axis.get_lines()] == ["broken", "healthy"]
    healthy = loss_axis.get_lines()[1]
    assert list(healthy.get_ydata()) == [v for _, v in runs[1].rank(0).scalar("loss")]
    main(["compare", "broken", "healthy", "--home", str(home), "-o", str(tmp_path / "c.html")])
    page = (tmp_path / "c.html").read_text()
    assert "2 runs compared" in page and "<svg" in page and ">healthy<" in page and "<script" not in page
    with pytest.raises(SystemExit):
        main(["compare", "broken", "--home", str(home)])
    assert "give two runs or more" in capsys.readouterr().err
