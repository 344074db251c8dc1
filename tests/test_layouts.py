"""Users' own datasets: the validation split, image folders without CSVs, resizing, decoders."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import carve_val_rows, error_lines, run_script, write_dataset
from imgpipe.data import load_processed, process_dataset
from imgpipe.data.processed import write_subset
from imgpipe.errors import PipelineError


def _rows(raw: Path, split: str) -> list[str]:
    return (raw / f"{split}.csv").read_text().splitlines()[1:]


def _pixels_digest(images: np.ndarray) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images]


@pytest.fixture
def labelled_raw(tmp_path: Path) -> Path:
    """Distinct 4x4 images, 3 classes of 9, 14 and 1 training images (the last class too
    small to give val one), 2 test images each."""
    rng = np.random.default_rng(7)

    def items(counts: dict[str, int]) -> list[tuple[str, np.ndarray]]:
        return [
            (label, rng.integers(0, 256, (4, 4), dtype=np.uint8))
            for label, n in counts.items()
            for _ in range(n)
        ]

    return write_dataset(
        tmp_path / "raw",
        {
            "train": items({"ant": 9, "bee": 14, "cat": 1}),
            "test": items(dict.fromkeys(("ant", "bee", "cat"), 2)),
        },
    )


def test_carved_val_is_stratified_disjoint_and_chosen_by_path_hashes(
    labelled_raw: Path, tmp_path: Path
) -> None:
    meta = process_dataset(labelled_raw, tmp_path / "processed", num_workers=1)
    data = load_processed(tmp_path / "processed")
    rows = _rows(labelled_raw, "train")
    train_rows, val_rows = carve_val_rows(rows)
    # 10% of 9 and of 14 rounds to 1; the class with one image keeps it in train.
    assert meta["splits"]["val"]["class_counts"] == {"ant": 1, "bee": 1, "cat": 0}
    assert meta["splits"]["train"]["class_counts"] == {"ant": 8, "bee": 13, "cat": 1}
    assert meta["validation"]["source"] == "carved from train"
    assert meta["validation"]["fraction"] == 0.1

    # The very files the path hashes name, in listing order; none of them also in train.
    def decoded(split_rows: list[str]) -> list[str]:
        return _pixels_digest(
            [np.asarray(Image.open(labelled_raw / r.split(",")[0]))[..., None] for r in split_rows]
        )

    assert _pixels_digest(data.val.images) == decoded(val_rows)
    assert _pixels_digest(data.train.images) == decoded(train_rows)
    assert not set(decoded(val_rows)) & set(decoded(train_rows))
    assert [data.classes[i] for i in data.val.labels] == [r.split(",")[1] for r in val_rows]
    # Normalisation comes from train alone.
    mean = np.asarray(data.train.images, dtype=np.float64).mean()
    assert abs(data.mean[0] - mean / 255.0) < 1e-6


def test_carved_val_is_the_same_for_any_listing_order_and_any_run(
    labelled_raw: Path, tmp_path: Path
) -> None:
    process_dataset(labelled_raw, tmp_path / "first", num_workers=1, val_fraction=0.3)
    first = load_processed(tmp_path / "first")
    rows = _rows(labelled_raw, "train")
    random.Random(3).shuffle(rows)
    (labelled_raw / "train.csv").write_text("filepath,label\n" + "\n".join(rows) + "\n")
    process_dataset(labelled_raw, tmp_path / "second", num_workers=2, val_fraction=0.3)
    second = load_processed(tmp_path / "second")
    assert sorted(_pixels_digest(second.val.images)) == sorted(_pixels_digest(first.val.images))
    assert len(second.val.labels) == 3 + 4  # round(9 * 0.3), round(14 * 0.3)


def test_a_raw_val_split_is_used_as_it_is(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)

    def items(n: int) -> list[tuple[str, np.ndarray]]:
        return [
            (label, rng.integers(0, 256, (5, 5), dtype=np.uint8))
            for label in "xy"
            for _ in range(n)
        ]

    splits = {"train": items(4), "val": items(3), "test": items(2)}
    raw = write_dataset(tmp_path / "raw", splits)
    meta = process_dataset(raw, tmp_path / "processed", num_workers=1)
    data = load_processed(tmp_path / "processed")
    assert meta["validation"]["source"] == "the raw data's own val split"
    assert [len(s.labels) for s in (data.train, data.val, data.test)] == [8, 6, 4]
    np.testing.assert_array_equal(data.val.images[..., 0], np.stack([p for _, p in splits["val"]]))


def test_subsets_cut_val_too(labelled_raw: Path, tmp_path: Path) -> None:
    process_dataset(labelled_raw, tmp_path / "processed", num_workers=1, val_fraction=0.3)
    out = write_subset(tmp_path / "processed", tmp_path / "subset", 5, 2, n_val=3)
    whole, part = load_processed(tmp_path / "processed"), load_processed(out)
    assert [len(s.labels) for s in (part.train, part.val, part.test)] == [5, 3, 2]
    np.testing.assert_array_equal(part.val.images, whole.val.images[:3])
    assert json.loads((out / "metadata.json").read_text())["validation"]["fraction"] == 0.3


def test_an_old_processed_folder_is_named_as_such(labelled_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "processed"
    process_dataset(labelled_raw, out, num_workers=1)
    meta = json.loads((out / "metadata.json").read_text())
    meta["format_version"] = 1
    (out / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError) as caught:
        load_processed(out)
    message = str(caught.value)
    assert "\n" not in message and str(out / "metadata.json") in message
    assert "older version" in message and "re-run process_data" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        pytest.param("val_fraction=0", "val_fraction", id="val-fraction-zero"),
        pytest.param("val_fraction=1.5", "val_fraction", id="val-fraction-above-one"),
    ],
)
def test_bad_settings_stop_with_one_line(
    labelled_raw: Path, tmp_path: Path, override: str, key: str
) -> None:
    out = tmp_path / "processed"
    result = run_script(
        "process_data.py",
        f"raw_data_dir_path={labelled_raw}",
        f"processed_data_dir_path={out}",
        f"log_dir={tmp_path / 'logs'}",
        override,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and f"'{key}'" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
