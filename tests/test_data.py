"""Sample export, raw validation and processing, through the real process_data entry point."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import carve_val_rows, error_lines, tree_digest, write_dataset
from imgpipe.data import encode_png_gray, export_sample_digits, load_processed, process_dataset
from imgpipe.testing import run_script


def test_png_encoder_round_trips_through_pillow() -> None:
    rng = np.random.default_rng(1)
    for shape in [(8, 8), (1, 1), (300, 301)]:  # 300x301 spans several stored blocks
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        decoded = np.asarray(Image.open(io.BytesIO(encode_png_gray(pixels))))
        assert decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, pixels)


def test_sample_export_is_deterministic_and_stratified(tmp_path: Path, sample_raw: Path) -> None:
    again = tmp_path / "raw"
    assert export_sample_digits(again) == 1797
    assert tree_digest(again) == tree_digest(sample_raw)

    train = (sample_raw / "train.csv").read_text().splitlines()
    test = (sample_raw / "test.csv").read_text().splitlines()
    assert train[0] == test[0] == "filepath,label"
    assert len(train) - 1 + len(test) - 1 == 1797
    labels_test = [row.split(",")[1] for row in test[1:]]
    # Stratified: every digit keeps about 20% of its images in test.
    for digit in map(str, range(10)):
        n_test = labels_test.count(digit)
        n_train = sum(1 for row in train[1:] if row.endswith("," + digit))
        assert abs(n_test / (n_test + n_train) - 0.2) < 0.01
    assert len(list((sample_raw / "train").rglob("*.png"))) == len(train) - 1


def test_processing_the_sample_writes_arrays_and_metadata(
    sample_raw: Path, sample_processed: Path
) -> None:
    meta = json.loads((sample_processed / "metadata.json").read_text())
    assert meta["classes"] == [str(d) for d in range(10)]
    assert meta["image_shape"] == [1, 8, 8]
    counts = {name: split["count"] for name, split in meta["splits"].items()}
    assert sum(counts.values()) == 1797
    # val is carved from train: 10% of each class (train.csv's rows, recomputed from paths).
    rows = (sample_raw / "train.csv").read_text().splitlines()[1:]
    train_rows, val_rows = carve_val_rows(rows)
    assert (counts["train"], counts["val"]) == (len(train_rows), len(val_rows))
    assert meta["validation"]["source"] == "carved from train"
    for split in meta["splits"].values():
        assert sum(split["class_counts"].values()) == split["count"]
    assert 0.1 < meta["normalization"]["mean"][0] < 0.5
    assert 0.2 < meta["normalization"]["std"][0] < 0.5
    assert sorted(p.name for p in sample_processed.iterdir()) == [
        "metadata.json",
        "test_images.npy",
        "test_labels.npy",
        "train_images.npy",
        "train_labels.npy",
        "val_images.npy",
        "val_labels.npy",
    ]
    data = load_processed(sample_processed)
    # Row i of train (of val) is exactly the i-th image listed in train.csv that stayed in
    # train (that went to val).
    for split, split_rows in ((data.train, train_rows), (data.val, val_rows)):
        for i in (0, len(split_rows) - 1):
            path, label = split_rows[i].split(",")
            pixels = np.asarray(Image.open(sample_raw / path))
            np.testing.assert_array_equal(split.images[i, :, :, 0], pixels)
            assert data.classes[split.labels[i]] == label


def test_rgb_non_square_images_with_named_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    items = {
        split: [
            (label, rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
            for label in ["zebra", "cat", "dog"]
            for _ in range(n)
        ]
        for split, n in [("train", 3), ("test", 2)]
    }
    raw = write_dataset(tmp_path / "raw", items)
    meta = process_dataset(raw, tmp_path / "processed", num_workers=2)
    assert meta["classes"] == ["cat", "dog", "zebra"]
    assert meta["image_shape"] == [3, 10, 12]
    data = load_processed(tmp_path / "processed")
    rows = (raw / "train.csv").read_text().splitlines()[1:]
    first = rows.index(carve_val_rows(rows)[0][0])
    np.testing.assert_array_equal(data.train.images[0], items["train"][first][1])
    assert data.classes[data.train.labels[0]] == "zebra"
    assert len(meta["normalization"]["mean"]) == 3


def test_other_encodings_decode_like_pillow(small_raw: Path, tmp_path: Path) -> None:
    """PNGs of the dataset's mode take a fast path; other modes and formats (a 1-bit PNG,
    a .bmp file) still decode to Pillow's own pixels. A BMP behind a .png name is refused
    (tests/test_hostile_input.py)."""
    rows = (small_raw / "train.csv").read_text().splitlines()
    one_bit, bmp = (small_raw / rows[i].split(",")[0] for i in (1, 3))
    Image.open(one_bit).convert("1").save(one_bit)
    renamed = bmp.with_suffix(".bmp")
    Image.open(bmp).save(renamed)
    bmp.unlink()
    rows[3] = rows[3].replace(".png", ".bmp")
    (small_raw / "train.csv").write_text("\n".join(rows) + "\n")

    process_dataset(small_raw, tmp_path / "processed", num_workers=2)
    data = load_processed(tmp_path / "processed")
    for split, split_rows in zip((data.train, data.val), carve_val_rows(rows[1:]), strict=True):
        for i, row in enumerate(split_rows):
            with Image.open(small_raw / row.split(",")[0]) as im:
                expected = np.asarray(im.convert("L"))
            np.testing.assert_array_equal(split.images[i][..., 0], expected, err_msg=row)


def test_process_data_cli_writes_output(small_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "processed"
    result = run_script(
        "process_data.py",
        f"raw_data_dir_path={small_raw}",
        f"processed_data_dir_path={out}",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metadata.json").read_text())["classes"] == ["ant", "bee", "cat"]
    # Logs are JSON lines in log_dir; Hydra leaves no folders of its own.
    records = [
        json.loads(line) for line in (tmp_path / "logs" / "imgpipe.jsonl").read_text().splitlines()
    ]
    assert any("wrote" in r["message"] for r in records)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def _corrupt(raw: Path) -> str:
    target = next((raw / "train" / "ant").glob("*.png"))
    target.write_bytes(b"this is not a png")
    return str(target)


def _truncate(raw: Path) -> str:
    target = next((raw / "train" / "bee").glob("*.png"))
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (6, 6), dtype=np.uint8)).save(target)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return str(target)


def _resize(raw: Path) -> str:
    target = sorted((raw / "train" / "cat").glob("*.png"))[-1]
    Image.fromarray(np.zeros((7, 6), dtype=np.uint8)).save(target)
    return str(target)


def _remode(raw: Path) -> str:
    target = sorted((raw / "test" / "cat").glob("*.png"))[-1]
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(target)
    return str(target)


def _missing_file(raw: Path) -> str:
    target = sorted((raw / "train" / "ant").glob("*.png"))[-1]
    target.unlink()
    return str(target)


def _wrong_label(raw: Path) -> str:
    csv = raw / "train.csv"
    lines = csv.read_text().splitlines()
    path, _ = lines[1].split(",")
    lines[1] = f"{path},bee"
    csv.write_text("\n".join(lines) + "\n")
    return f"{csv} line 2"


def _empty_class(raw: Path) -> str:
    (raw / "train" / "dog").mkdir()
    return str(raw / "train" / "dog")


def _empty_dir(raw: Path) -> str:
    for p in sorted(raw.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    return str(raw)


def _missing_dir(raw: Path) -> str:
    _empty_dir(raw)
    raw.rmdir()
    return str(raw)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param(_missing_dir, "not found", id="missing-raw-dir"),
        pytest.param(_empty_dir, "is empty", id="empty-raw-dir"),
        pytest.param(_empty_class, "has no images", id="class-folder-without-images"),
        pytest.param(_corrupt, "cannot decode", id="corrupt-png"),
        pytest.param(_truncate, "cannot decode", id="truncated-png"),
        pytest.param(_resize, "differs from the dataset", id="different-size"),
        pytest.param(_remode, "differs from the dataset", id="different-mode"),
        pytest.param(_missing_file, "image file not found", id="csv-row-missing-file"),
        pytest.param(_wrong_label, "disagrees with its folder", id="label-disagrees-with-folder"),
    ],
)
def test_bad_raw_data_stops_with_one_line_and_keeps_previous_output(
    small_raw: Path, tmp_path: Path, damage, expected: str
) -> None:
    out = tmp_path / "processed"
    process_dataset(small_raw, out, num_workers=1)
    before = tree_digest(out)
    culprit = damage(small_raw)

    result = run_script(
        "process_data.py",
        f"raw_data_dir_path={small_raw}",
        f"processed_data_dir_path={out}",
        f"log_dir={tmp_path / 'logs'}",
        "num_workers=2",
        cwd=tmp_path,
    )

    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert culprit in errors[0] and expected in errors[0]
    assert "Traceback" not in result.stderr
    assert tree_digest(out) == before  # the earlier output is intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
