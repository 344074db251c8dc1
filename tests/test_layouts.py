"""Users' own datasets: the validation split, image folders without CSVs, resizing, decoders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import carve_val_rows, error_lines, write_dataset
from imgpipe.data import load_processed, process_dataset
from imgpipe.data.decoders import decode_fast
from imgpipe.data.processed import write_subset
from imgpipe.errors import PipelineError
from imgpipe.testing import run_script, train_config


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
        pytest.param("image_size=[0,8]", "image_size", id="image-size-zero"),
        pytest.param("image_size=[8]", "image_size", id="image-size-one-number"),
        pytest.param("image_size=big", "image_size", id="image-size-not-a-list"),
        pytest.param("image_size=[20000,20000]", "image_size", id="image-size-over-pixel-limit"),
        pytest.param("image_mode=CMYK", "image_mode", id="image-mode-cmyk"),
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


# --------------------------------------------------------------------------- layouts


def _gradient(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Smooth pixels with a little noise: like a photo to a JPEG encoder."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    planes = [(xx * (3 + c) + yy * (5 - c) + seed * 17) % 256 for c in range(channels)]
    pixels = np.stack(planes, -1) + rng.integers(0, 40, (height, width, channels))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return pixels[..., 0] if channels == 1 else pixels


def _save(path: Path, pixels: np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return path


def _image_folder(root: Path, train_per_class: int = 6, test_per_class: int = 2) -> Path:
    """An ImageFolder dataset with no CSV: PNG (grey), JPEG and WebP (RGB) of mixed sizes,
    plus what a desktop leaves behind (hidden files and folders, a text file)."""
    kinds = [("png", 1, {}), ("jpg", 3, {"quality": 90}), ("webp", 3, {"lossless": True})]
    seed = 0
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label in ("tabby", "calico"):
            for i in range(n):
                ext, channels, options = kinds[i % 3]
                shape = (10 + i % 4, 12 + seed % 5)
                seed += 1
                _save(
                    root / split / label / f"img{i}.{ext}",
                    _gradient(*shape, channels, seed),
                    **options,
                )
        (root / split / "tabby" / ".DS_Store").write_bytes(b"\0\1")
        (root / split / "tabby" / "notes.txt").write_text("not an image")
        (root / split / ".ipynb_checkpoints").mkdir()
    return root


def _pillow_pixels(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    """What process_data must make of ``path``: Pillow's own decode, converted, then resized
    with the documented filter ((height, width) ``size``)."""
    with Image.open(path) as im:
        im = im.convert(mode).resize(
            (size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=None
        )
        pixels = np.asarray(im)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def test_an_image_folder_without_csvs_processes_and_trains(tmp_path: Path) -> None:
    raw = _image_folder(tmp_path / "raw")
    out = tmp_path / "processed"
    meta = process_dataset(raw, out, num_workers=1, image_size=(8, 9), image_mode="RGB")
    assert meta["classes"] == ["calico", "tabby"]  # the folders, sorted; hidden ones skipped
    assert meta["image_shape"] == [3, 8, 9]
    assert meta["preprocessing"]["image_size"] == [8, 9]
    assert meta["preprocessing"]["image_mode"] == "RGB"
    assert {n: s["count"] for n, s in meta["splits"].items()} == {"train": 10, "val": 2, "test": 4}
    data = load_processed(out)
    # Rows in the order of the sorted relative paths; val carved by the paths' hashes.
    listed = sorted(f"train/{p.parent.name}/{p.name}" for p in (raw / "train").glob("*/img*"))
    train_rows, val_rows = carve_val_rows([f"{rel},{rel.split('/')[1]}" for rel in listed])
    for split, rows in ((data.train, train_rows), (data.val, val_rows)):
        expected = [_pillow_pixels(raw / r.split(",")[0], (8, 9), "RGB") for r in rows]
        np.testing.assert_array_equal(split.images, np.stack(expected))
        assert [data.classes[i] for i in split.labels] == [r.split(",")[1] for r in rows]
    test_files = sorted((raw / "test").glob("*/img*"), key=lambda p: f"{p.parent.name}/{p.name}")
    np.testing.assert_array_equal(
        data.test.images, np.stack([_pillow_pixels(p, (8, 9), "RGB") for p in test_files])
    )

    from imgpipe.train import train  # torch: imported by this test alone

    cfg = train_config(out, tmp_path / "run", epochs=1, train_bs=4, setup_mlflow=False)
    result = train(cfg)
    assert np.isfinite(result.train_loss) and 0 <= result.test_accuracy <= 1
    assert (tmp_path / "run" / "models" / "model.pt").is_file()


def test_each_split_is_listed_by_its_csv_or_else_by_its_folder(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for i in range(4):
        _save(raw / "train" / "a" / f"{i}.png", _gradient(5, 5, 1, i))
        _save(raw / "train" / "b" / f"{i}.png", _gradient(5, 5, 1, 10 + i))
        _save(raw / "test" / "b" / f"{i}.png", _gradient(5, 5, 1, 20 + i))
    # train.csv stays authoritative: the images it leaves out are not read.
    rows = [f"train/{label}/{i}.png,{label}" for label in "ab" for i in range(3)]
    (raw / "train.csv").write_text("filepath,label\n" + "\n".join(rows) + "\n")
    meta = process_dataset(raw, tmp_path / "processed", num_workers=1)
    assert meta["splits"]["train"]["count"] + meta["splits"]["val"]["count"] == 6
    assert meta["splits"]["test"]["class_counts"] == {"a": 0, "b": 4}
    data = load_processed(tmp_path / "processed")
    expected = [np.asarray(Image.open(raw / "test" / "b" / f"{i}.png")) for i in range(4)]
    np.testing.assert_array_equal(data.test.images[..., 0], np.stack(expected))


def _many_sizes(root: Path, count: int) -> Path:
    for i in range(count):
        split = "test" if i % 5 == 0 else "train"
        shape = (6 + i % 3, 7 + i % 4)
        if i % 2:
            _save(root / split / str(i % 3) / f"{i:04d}.jpg", _gradient(*shape, 3, i), quality=85)
        else:
            _save(root / split / str(i % 3) / f"{i:04d}.png", _gradient(*shape, 1, i))
    return root


def test_mixed_sizes_are_refused_unless_image_size_is_set(tmp_path: Path) -> None:
    raw = _many_sizes(tmp_path / "raw", 700)  # over 256 per chunk: two workers share it
    with pytest.raises(PipelineError, match="differs from the dataset's") as refused:
        process_dataset(raw, tmp_path / "refused", num_workers=1)
    assert "\n" not in str(refused.value) and str(raw) in str(refused.value)
    assert not (tmp_path / "refused").exists()

    settings = {"image_size": (6, 6), "image_mode": "L"}
    one = process_dataset(raw, tmp_path / "one", num_workers=1, **settings)
    two = process_dataset(raw, tmp_path / "two", num_workers=2, **settings)
    assert one == two
    for name in ("train", "val", "test"):
        a = np.load(tmp_path / "one" / f"{name}_images.npy")
        np.testing.assert_array_equal(a, np.load(tmp_path / "two" / f"{name}_images.npy"))
    assert a.shape[1:] == (6, 6, 1)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param("link-out", "leads outside", id="link-out-of-the-dataset"),
        pytest.param("fifo", "is not a regular file", id="fifo"),
    ],
)
def test_a_folder_listing_refuses_what_a_csv_would(
    tmp_path: Path, damage: str, expected: str
) -> None:
    raw = _image_folder(tmp_path / "raw")
    culprit = raw / "train" / "tabby" / "zz.png"
    if damage == "link-out":
        outside = _save(tmp_path / "elsewhere.png", _gradient(10, 12, 1, 99))
        culprit.symlink_to(outside)
    else:
        os.mkfifo(culprit)
    result = run_script(
        "process_data.py",
        f"raw_data_dir_path={raw}",
        f"processed_data_dir_path={tmp_path / 'processed'}",
        f"log_dir={tmp_path / 'logs'}",
        "image_size=[8,8]",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and str(culprit) in errors[0] and expected in errors[0], result.stderr
    assert not (tmp_path / "processed").exists()


# --------------------------------------------------------------------------- decoders


def _encoded(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


COMMON = [
    pytest.param("png", _gradient(28, 28, 1, 1), {}, id="png-gray-8bit"),
    pytest.param("png", _gradient(21, 30, 3, 2), {"compress_level": 9}, id="png-rgb-8bit"),
    pytest.param("jpg", _gradient(128, 128, 3, 3), {"quality": 90}, id="jpeg-rgb-420"),
    pytest.param("jpg", _gradient(37, 53, 3, 4), {"subsampling": 0}, id="jpeg-rgb-444"),
    pytest.param("jpg", _gradient(37, 53, 3, 5), {"progressive": True}, id="jpeg-progressive"),
    pytest.param("jpg", _gradient(40, 30, 1, 6), {}, id="jpeg-gray"),
]


@pytest.mark.parametrize(("ext", "pixels", "options"), COMMON)
def test_the_fast_decoders_give_pillows_pixels(
    tmp_path: Path, ext: str, pixels: np.ndarray, options: dict
) -> None:
    path = tmp_path / f"image.{ext}"
    path.write_bytes(_encoded(pixels, "PNG" if ext == "png" else "JPEG", **options))
    fast = decode_fast(str(path), 0)
    assert fast is not None, "the fast decoder should take this file"
    with Image.open(path) as im:
        expected = np.asarray(im)
        np.testing.assert_array_equal(fast[0], expected)
        assert fast[1] == im.mode
    # Decoded into a chunk's row, as process_data does (in place for JPEG).
    row = np.zeros((*pixels.shape[:2], 1 if pixels.ndim == 2 else 3), dtype=np.uint8)
    into = decode_fast(str(path), 0, out=row)
    assert into is not None
    np.testing.assert_array_equal(into[0], expected)
    if ext == "jpg":
        np.testing.assert_array_equal(row.reshape(expected.shape), expected)


def _unusual() -> list:
    rgb, gray = _gradient(9, 11, 3, 7), _gradient(9, 11, 1, 8)
    palette = Image.fromarray(rgb).quantize(16)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    sixteen = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 200).save(sixteen, format="PNG")
    rgba = np.dstack([rgb, np.full(gray.shape, 200, np.uint8)])
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    damaged = bytearray(_encoded(gray, "PNG"))
    damaged[-20] ^= 0xFF  # inside IDAT: its CRC no longer matches
    return [
        pytest.param(buffer.getvalue(), "png", id="png-palette"),
        pytest.param(sixteen.getvalue(), "png", id="png-16bit"),
        pytest.param(_encoded(rgba, "PNG"), "png", id="png-rgba"),
        pytest.param(_encoded(gray, "PNG", transparency=3), "png", id="png-transparent-gray-key"),
        pytest.param(_encoded(rgb, "PNG", icc_profile=b"\0" * 128), "png", id="png-icc-profile"),
        pytest.param(bytes(damaged), "png", id="png-bad-crc"),
        pytest.param(cmyk.getvalue(), "jpg", id="jpeg-cmyk"),
        pytest.param(_encoded(rgb, "JPEG")[:200], "jpg", id="jpeg-truncated"),
    ]


@pytest.mark.parametrize(("data", "ext"), _unusual())
def test_unusual_files_are_left_to_pillow(tmp_path: Path, data: bytes, ext: str) -> None:
    path = tmp_path / f"image.{ext}"
    path.write_bytes(data)
    assert decode_fast(str(path), 0) is None


def test_the_fast_decoders_check_the_pixel_limit_first(tmp_path: Path) -> None:
    for ext, fmt in (("png", "PNG"), ("jpg", "JPEG")):
        path = tmp_path / f"big.{ext}"
        path.write_bytes(_encoded(_gradient(40, 50, 3, 1), fmt))
        with pytest.raises(
            PipelineError, match=r"40 = 2000 pixels, more than max_image_pixels=1999"
        ):
            decode_fast(str(path), 1999)


def test_without_the_fast_wheels_pillow_gives_the_same_arrays(tmp_path: Path) -> None:
    raw = _many_sizes(tmp_path / "raw", 60)
    process_dataset(raw, tmp_path / "fast", num_workers=1, image_size=(6, 6), image_mode="RGB")
    # A Python without pyspng and simplejpeg: importing them fails, as when not installed.
    script = (
        "import sys; sys.modules['pyspng'] = sys.modules['simplejpeg'] = None\n"
        "from imgpipe.data import process_dataset\n"
        "from imgpipe.data.decoders import available\n"
        "assert available() == {'PNG': False, 'JPEG': False}\n"
        f"process_dataset({str(raw)!r}, {str(tmp_path / 'pillow')!r}, num_workers=1,"
        " image_size=(6, 6), image_mode='RGB')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    for name in ("train", "val", "test"):
        fast = np.load(tmp_path / "fast" / f"{name}_images.npy")
        np.testing.assert_array_equal(fast, np.load(tmp_path / "pillow" / f"{name}_images.npy"))


def test_fast_and_pillow_only_processing_write_the_same_arrays(tmp_path: Path) -> None:
    """Same-size files take the fast path all the way (JPEGs decoded in place)."""
    raw = tmp_path / "raw"
    for i in range(24):
        split, label = ("test" if i % 4 == 0 else "train"), "ab"[i % 2]
        _save(raw / split / label / f"{i}.jpg", _gradient(10, 12, 3, i), quality=80 + i)
    process_dataset(raw, tmp_path / "fast", num_workers=1)
    process_dataset(raw, tmp_path / "pillow", num_workers=1, fast_decoders=False)
    for name in ("train", "val", "test"):
        fast = np.load(tmp_path / "fast" / f"{name}_images.npy")
        np.testing.assert_array_equal(fast, np.load(tmp_path / "pillow" / f"{name}_images.npy"))


# --------------------------------------------------------------------------- photos resized down


def _photos(root: Path, count: int) -> Path:
    """JPEG photos of mixed sizes around 1, 2, 4 and 8+ times (24, 32): every DCT scale,
    grey and RGB, baseline and progressive, 4:2:0 and 4:4:4; over a chunk, so that two
    workers share the work."""
    sizes = [(260, 200), (130, 100), (70, 50), (40, 30), (300, 100), (65, 97)]
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        options = {"quality": 85, "progressive": i % 3 == 0, "subsampling": 0 if i % 4 else 2}
        split = "test" if i % 5 == 0 else "train"
        pixels = _gradient(height, width, 1 if i % 7 == 0 else 3, i)
        _save(root / split / "ab"[i % 2] / f"{i:04d}.jpg", pixels, **options)
    return root


def test_photos_resized_down_decode_at_a_reduced_scale_the_same_everywhere(
    tmp_path: Path,
) -> None:
    raw = _photos(tmp_path / "raw", 300)
    settings = {"image_size": (24, 32), "image_mode": "RGB"}
    meta = process_dataset(raw, tmp_path / "one", num_workers=1, **settings)
    process_dataset(raw, tmp_path / "two", num_workers=2, **settings)
    process_dataset(raw, tmp_path / "pillow", num_workers=2, fast_decoders=False, **settings)
    assert "1/2, 1/4 or 1/8" in meta["preprocessing"]["jpeg_scaling"]

    test = sorted((raw / "test").rglob("*.jpg"), key=lambda p: (p.parent.name, p.name))
    one = np.load(tmp_path / "one" / "test_images.npy")
    for name in ("train", "val", "test"):
        a = np.load(tmp_path / "one" / f"{name}_images.npy")
        for other in ("two", "pillow"):  # any number of workers, either decoder
            np.testing.assert_array_equal(a, np.load(tmp_path / other / f"{name}_images.npy"))

    # The documented rule, done by hand with Pillow: draft (1/2, 1/4, 1/8 while both sides
    # stay >= the target), convert, then the usual resize. A full-size decode differs a little.
    full = []
    for path, got in zip(test, one, strict=True):
        with Image.open(path) as im:
            im.draft(None, (32, 24))
            expected = im.convert("RGB").resize(
                (32, 24), Image.Resampling.BILINEAR, reducing_gap=None
            )
        np.testing.assert_array_equal(got, np.asarray(expected), err_msg=str(path))
        full.append(_pillow_pixels(path, (24, 32), "RGB"))
    difference = np.abs(one.astype(int) - np.stack(full).astype(int))
    assert difference.any()  # the rule was exercised: these are not full-size decodes
