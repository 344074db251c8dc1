"""imgpipe.plots without a browser: which charts a dvclive folder gives, the files dvc.yaml's
plots name, the offline bundle, and `imgpipe plots page` in a real DVC repo whose plots wait
for stages that have not run (the page itself is drawn in tests/test_browser.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import error_lines
from imgpipe.errors import PipelineError
from imgpipe.plots import bundle_header, bundle_text, draw_images, metric_series, plot_files
from imgpipe.testing import dvc
from imgpipe.tracking.live import LiveLog

PNG = b"\x89PNG\r\n\x1a\n"


def fill(live_dir: Path, images: bool) -> None:
    """Three epochs through the project's dvclive room, as training logs them."""
    live = LiveLog(live_dir, images=images)
    for step in (1, 2, 3):
        live.log_epoch(
            step,
            {
                "train/loss": 1.0 / step,
                "train/accuracy": 0.5 + step / 10,
                "val/loss": 1.2 / step,
                "val/accuracy": 0.4 + step / 10,
                "val/f1": 0.3 + step / 10,  # a metric the project does not log today
            },
        )
    live.log_confusion_matrix(["a", "b", "b", "c"], ["a", "b", "c", "c"])
    live.end().join()  # the images are drawn on a thread: joined as the Tracker does


def test_training_ends_with_one_png_per_metric_name_and_the_confusion_matrix(
    tmp_path: Path,
) -> None:
    fill(tmp_path / "dvclive", images=True)
    static = tmp_path / "dvclive" / "plots" / "static"
    assert sorted(p.name for p in static.iterdir()) == [
        "accuracy.png",
        "confusion_matrix.png",
        "f1.png",
        "loss.png",
    ]
    assert all(p.read_bytes().startswith(PNG) for p in static.iterdir())
    series = metric_series(tmp_path / "dvclive")
    assert {name: sorted(s) for name, s in series.items()} == {
        "accuracy": ["train", "val"],
        "f1": ["val"],
        "loss": ["train", "val"],
    }
    assert series["loss"]["val"] == [(1.0, 1.2), (2.0, 0.6), (3.0, pytest.approx(0.4))]
    # the same data draws the same bytes: DVC sees an unchanged output
    before = {p.name: p.read_bytes() for p in static.iterdir()}
    draw_images(tmp_path / "dvclive")
    assert {p.name: p.read_bytes() for p in static.iterdir()} == before


def test_live_images_off_draws_nothing(tmp_path: Path) -> None:
    fill(tmp_path / "dvclive", images=False)
    assert not (tmp_path / "dvclive" / "plots" / "static").exists()


def test_plot_files_reads_every_form_dvc_yaml_allows(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text(
        "plots:\n"
        "  - a/loss.tsv\n"
        "  - b/acc.tsv:\n"
        "      x: step\n"
        "  - Both:\n"
        "      x: step\n"
        "      y:\n"
        "        c/train.tsv: loss\n"
        "        c/val.tsv: loss\n"
    )
    assert plot_files(tmp_path) == ["a/loss.tsv", "b/acc.tsv", "c/train.tsv", "c/val.tsv"]
    (tmp_path / "dvc.yaml").write_text("plots: [\n")
    with pytest.raises(PipelineError, match=r"dvc\.yaml"):
        plot_files(tmp_path)


def test_the_bundle_is_built_offline_and_reused_while_vl_convert_is_the_same(
    tmp_path: Path,
) -> None:
    earlier = tmp_path / "vega.js"
    earlier.write_text(bundle_header() + "/* kept */\n")
    assert bundle_text(earlier).endswith("/* kept */\n")
    earlier.write_text("/* vega 0.1 ... an older bundle */\nstale\n")
    built = bundle_text(earlier)
    assert built.startswith(bundle_header()) and "stale" not in built
    # the three libraries, on window for DVC's inline vegaEmbed(...) calls
    assert "window.vegaEmbed=" in built and "window.vega=" in built
    assert "window.vegaLite=" in built


# --------------------------------------------------------------------------- the page, stages not run

# Three stages as the project's: train has run (its curve is here); predict, a make target
# whose output folder comes from params.yaml, and report, a plain command, have not.
STAGES = """\
stages:
  train:
    cmd: make train
    outs:
      - live:
          cache: false
  predict:
    cmd: make predict
    outs:
      - ${predict_output_dir}
  report:
    cmd: python report.py
    outs:
      - reports
plots:
  - live/loss.tsv:
      x: step
  - Confusion:
      template: confusion
      x: actual
      y:
        predictions/confusion_matrix.json: predicted
  - reports/score.tsv:
      x: step
"""
WAITING = [
    "predictions/confusion_matrix.json not drawn: run `make predict` first "
    "(stage predict has not run here)",
    "reports/score.tsv not drawn: run `dvc repro report` first (stage report has not run here)",
]


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    """A git + DVC repo of ``STAGES`` in which only train has run."""
    repo = tmp_path / "repo"
    (repo / "live").mkdir(parents=True)
    (repo / "live" / "loss.tsv").write_text("step\tloss\n1\t0.9137\n2\t0.4211\n")
    (repo / "dvc.yaml").write_text(STAGES)
    (repo / "params.yaml").write_text("predict_output_dir: predictions\n")
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    assert dvc(repo, "init", "-q").returncode == 0
    return repo


def plots_page(repo: Path) -> subprocess.CompletedProcess[str]:
    """`imgpipe plots page` in ``repo``, as `make plots` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "imgpipe", "plots", "page"],
        cwd=repo, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_the_page_draws_before_later_stages_run_and_says_which_to_run(staged: Path) -> None:
    first = plots_page(staged)
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines() == WAITING, first.stderr
    page = (staged / "dvc_plots" / "index.html").read_text()
    assert "0.4211" in page  # train's curve is on the page
    assert "cdn.jsdelivr.net" not in page

    (staged / "predictions").mkdir()  # `make predict` has run: its plot joins, quietly
    (staged / "predictions" / "confusion_matrix.json").write_text(
        '[{"actual": "a", "predicted": "a"}, {"actual": "b", "predicted": "a"}]'
    )
    second = plots_page(staged)
    assert second.returncode == 0, second.stderr
    assert second.stderr.splitlines() == WAITING[1:], second.stderr
    assert '"predicted": "a"' in (staged / "dvc_plots" / "index.html").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param(
            lambda repo: (repo / "live" / "loss.tsv").unlink(),
            "error: live/loss.tsv (a plot in dvc.yaml) is missing: train first (`make train`)",
            id="the-stage-ran-without-it",
        ),
        pytest.param(
            lambda repo: (repo / "dvc.yaml").write_text(STAGES + "  - elsewhere/acc.tsv\n"),
            "error: elsewhere/acc.tsv (a plot in dvc.yaml) is missing, and no stage of "
            "dvc.yaml writes it",
            id="no-stage-writes-it",
        ),
    ],
)
def test_a_plot_missing_where_no_stage_left_to_run_writes_it_is_one_line_and_keeps_the_page(
    staged: Path, damage, expected: str
) -> None:
    assert plots_page(staged).returncode == 0
    before = (staged / "dvc_plots" / "index.html").read_bytes()
    damage(staged)
    result = plots_page(staged)
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [expected], result.stderr
    assert "Traceback" not in result.stderr
    assert (staged / "dvc_plots" / "index.html").read_bytes() == before
