"""imgpipe.plots without a browser: which charts a dvclive folder gives, the files dvc.yaml's
plots name, the offline bundle (the page itself is drawn in tests/test_browser.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgpipe.errors import PipelineError
from imgpipe.plots import bundle_header, bundle_text, draw_images, metric_series, plot_files
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
    live.end()


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
