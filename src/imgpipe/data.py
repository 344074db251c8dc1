"""Raw image-folder datasets: the sample export, validation, processing and loading.

Raw layout (what users bring, tracked by ``data.dvc``)::

    data/raw/<split>.csv                 header ``filepath,label``; paths relative to data/raw
    data/raw/<split>/<label>/<id>.png    one image per file, grayscale or RGB, one size

Processed layout (what ``process_data`` writes and ``train`` reads)::

    data/processed/<split>_images.npy    uint8, shape (N, H, W, C), memory-mappable
    data/processed/<split>_labels.npy    int64 class indices, shape (N,)
    data/processed/metadata.json         classes, image shape, counts, normalisation stats

This module never imports torch: processing stays light and starts fast.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import logging
import math
import os
import struct
import zlib
from array import array
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.atomic import atomic_dir
from imgpipe.errors import PipelineError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
REQUIRED_SPLITS = ("train", "test")
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
SAMPLE_SEED = 20241127
SAMPLE_TEST_FRACTION = 0.2


# --------------------------------------------------------------------------- sample data


def encode_png_gray(pixels: np.ndarray) -> bytes:
    """Encode an 8-bit grayscale image as PNG, byte-for-byte the same on every machine.

    Pillow and zlib builds (zlib vs zlib-ng) compress differently, which would
    change the bytes and so the hashes in data.dvc. Stored (uncompressed) deflate
    blocks have exactly one encoding; for 8x8 digits the size cost is nil.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError("expected a 2-D uint8 array")
    height, width = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))
    blocks = []
    for start in range(0, max(len(raw), 1), 0xFFFF):
        part = raw[start : start + 0xFFFF]
        final = 1 if start + 0xFFFF >= len(raw) else 0
        blocks.append(struct.pack("<BHH", final, len(part), len(part) ^ 0xFFFF) + part)
    stream = b"\x78\x01" + b"".join(blocks) + struct.pack(">I", zlib.adler32(raw))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
    )


def stratified_split(
    labels: Sequence[int], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices per class by a keyed hash: stable across numpy/sklearn versions."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        members = sorted(
            by_class[label],
            key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(),
        )
        n_test = round(len(members) * test_fraction)
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return sorted(train), sorted(test)


def write_image_folder(
    out_dir: Path, images: np.ndarray, labels: Sequence[str], splits: dict[str, list[int]]
) -> None:
    """Write grayscale uint8 ``images`` as ``<split>/<label>/<id>.png`` plus ``<split>.csv``."""
    width = max(4, len(str(len(images) - 1)))
    for split, indices in splits.items():
        rows = []
        for index in indices:
            label = labels[index]
            rel = f"{split}/{label}/{index:0{width}d}.png"
            path = out_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png_gray(images[index]))
            rows.append((rel, label))
        rows.sort()
        with open(out_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(("filepath", "label"))
            writer.writerows(rows)


def export_sample_digits(out_dir: str | os.PathLike[str]) -> int:
    """Export scikit-learn's 1,797 handwritten 8x8 digits into the raw layout.

    The pixels (0..16) are scaled to 0..255; the split is stratified and seeded.
    The output is byte-for-byte deterministic so the committed data.dvc matches.
    Returns the number of images written.
    """
    from sklearn.datasets import load_digits  # ships the data; no download

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = [str(int(t)) for t in digits.target]
    train, test = stratified_split(digits.target, SAMPLE_TEST_FRACTION, SAMPLE_SEED)
    with atomic_dir(out_dir) as tmp:
        write_image_folder(tmp, images, labels, {"train": train, "test": test})
    return len(images)


# --------------------------------------------------------------------------- raw reading


@dataclass(frozen=True)
class RawSplit:
    """One split's rows, stored compactly: a million rows take tens of MB, not hundreds.

    Row ``i`` is the image ``<root>/<name>/<label_names[codes[i]]>/<files[i]>``.
    """

    name: str
    root: str
    label_names: list[str]  # distinct labels, in order of first appearance
    codes: array  # per row: index into label_names
    files: list[str]  # per row: the file name inside its class folder

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.name, self.label_names[self.codes[i]], self.files[i])

    def paths(self, start: int, stop: int) -> list[str]:
        folders = [os.path.join(self.root, self.name, label) for label in self.label_names]
        return [
            os.path.join(folders[code], name)
            for code, name in zip(self.codes[start:stop], self.files[start:stop], strict=True)
        ]


def _scan_split(split_dir: Path) -> dict[str, set[str]]:
    """Image file names per class folder of one split."""
    found: dict[str, set[str]] = {}
    if not split_dir.is_dir():
        return found
    with os.scandir(split_dir) as classes:
        for entry in classes:
            if entry.is_dir():
                with os.scandir(entry.path) as images:
                    found[entry.name] = {
                        e.name for e in images if e.name.lower().endswith(IMAGE_SUFFIXES)
                    }
    return found


def _sort_labels(labels: set[str]) -> list[str]:
    """Numeric labels in numeric order (2 before 10), anything else alphabetically."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _read_split_csv(raw_dir: Path, csv_path: Path) -> RawSplit:
    """Validate one split's CSV row by row as it streams in (no copy of the rows is kept).

    One directory scan replaces a stat per row; each listed file is taken out of the scan's
    sets, so what remains is the unlisted files and a second listing is a duplicate.
    """
    split = csv_path.stem
    root = str(raw_dir)
    on_disk = _scan_split(raw_dir / split)
    empty_folders = [label for label, names in sorted(on_disk.items()) if not names]
    label_code: dict[str, int] = {}
    codes = array("i")
    files: list[str] = []
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            fields = [f.strip() for f in next(reader, [])]
            if "filepath" not in fields or "label" not in fields:
                raise PipelineError(
                    f"{csv_path}: header must contain 'filepath,label' (found {','.join(fields)!r})"
                )
            at_path, at_label = fields.index("filepath"), fields.index("label")
            width = max(at_path, at_label) + 1
            for line, row in enumerate(reader, start=2):
                rel, label = (
                    (row[at_path].strip(), row[at_label].strip()) if len(row) >= width else ("", "")
                )
                if not rel or not label:
                    raise PipelineError(f"{csv_path} line {line}: empty filepath or label")
                parts = rel.split("/")
                if rel.startswith("/") or ".." in parts:
                    raise PipelineError(
                        f"{csv_path} line {line}: filepath {rel!r} points outside {raw_dir}"
                    )
                if len(parts) != 3 or parts[0] != split:
                    raise PipelineError(
                        f"{csv_path} line {line}: filepath {rel!r} is not of the form "
                        f"{split}/<label>/<file>"
                    )
                if parts[1] != label:
                    raise PipelineError(
                        f"{csv_path} line {line}: label {label!r} disagrees with its folder "
                        f"{parts[0]}/{parts[1]}/"
                    )
                unlisted = on_disk.get(label)
                name = parts[2]
                if unlisted is None or name not in unlisted:
                    path = os.path.join(root, rel)
                    if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path):
                        raise PipelineError(f"{csv_path} line {line}: duplicate filepath {rel!r}")
                    raise PipelineError(f"{csv_path} line {line}: image file not found: {path}")
                unlisted.remove(name)
                code = label_code.setdefault(label, len(label_code))
                codes.append(code)
                files.append(name)
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{csv_path}: not a UTF-8 CSV file ({exc.reason})") from exc
    except csv.Error as exc:
        raise PipelineError(f"{csv_path}: malformed CSV ({exc})") from exc
    if not files:
        raise PipelineError(f"{csv_path}: no rows; every split needs at least one image")

    # A class folder with no images is almost always a failed copy: say so.
    if empty_folders:
        raise PipelineError(f"class folder {raw_dir / split / empty_folders[0]} has no images")
    unlisted_count = sum(len(names) for names in on_disk.values())
    if unlisted_count > 0:
        log.warning(
            "%d image(s) under %s are not listed in %s; ignored",
            unlisted_count,
            raw_dir / split,
            csv_path,
        )
    return RawSplit(split, root, list(label_code), codes, files)


def read_raw_dataset(raw_dir: str | os.PathLike[str]) -> dict[str, RawSplit]:
    """Read and validate every ``<split>.csv`` in ``raw_dir``; train and test are required."""
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise PipelineError(f"raw data directory not found: {raw} (run `make data` for the sample)")
    csvs = sorted(raw.glob("*.csv"))
    if not csvs:
        what = "is empty" if not any(raw.iterdir()) else "has no <split>.csv files"
        raise PipelineError(f"raw data directory {raw} {what}: expected train.csv and test.csv")
    names = {p.stem for p in csvs}
    missing = [s for s in REQUIRED_SPLITS if s not in names]
    if missing:
        raise PipelineError(
            f"raw data directory {raw}: missing {', '.join(s + '.csv' for s in missing)}"
        )
    splits = {p.stem: _read_split_csv(raw, p) for p in csvs}
    train_classes = set(splits["train"].label_names)
    for name, split in splits.items():
        extra = set(split.label_names) - train_classes
        if extra:
            raise PipelineError(
                f"{raw / (name + '.csv')}: label(s) {sorted(extra)} never appear in train.csv"
            )
    return splits


# --------------------------------------------------------------------------- decoding


def _open_image(path: Path):
    """Decode one image fully (truncation surfaces here) as mode L or RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("LA", "RGBA", "PA") or (mode == "P" and "transparency" in im.info):
                raise PipelineError(f"{path}: image has an alpha channel; use grayscale or RGB")
            if mode == "1":
                return im.convert("L")
            if mode == "P":
                return im.convert("RGB")
            if mode not in ("L", "RGB"):
                raise PipelineError(
                    f"{path}: unsupported image mode {mode!r}; use grayscale or RGB"
                )
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot decode image ({exc})") from exc


def _matching_pixels(path: str, size: tuple[int, int], mode: str) -> bytes | None:
    """The pixel rows of an image already in the dataset's mode and size, else None.

    A ``.png`` opens straight through Pillow's PNG decoder (``Image.open``'s format
    probing, and ``np.asarray``'s array interface after it, cost about a fifth of a
    28x28 PNG's decode). Mode and size come from the header, before any pixel is read;
    as only the dataset's size decodes here, Pillow's decompression-bomb check, which
    the reference image passed, is not needed again. ``path`` is a string: Pillow opens
    a ``pathlib.Path`` about 7 us slower.
    """
    from PIL import Image, PngImagePlugin

    im = None
    if path.lower().endswith(".png"):
        with contextlib.suppress(SyntaxError):  # not a PNG inside: Image.open finds out
            im = PngImagePlugin.PngImageFile(path)
    if im is None:
        im = Image.open(path)
    with im:
        return im.tobytes() if im.mode == mode and im.size == size else None


def _channels(mode: str) -> int:
    return 1 if mode == "L" else 3


def _decode_pixels(path: str, size: tuple[int, int], mode: str) -> bytes:
    """One image's pixel rows as bytes, checked against the dataset's size and mode;
    other modes are converted where they can be, and what cannot is named."""
    from PIL import UnidentifiedImageError

    try:
        pixels = _matching_pixels(path, size, mode)
        if pixels is not None:
            return pixels
        im = _open_image(Path(path))
        if im.size != size:
            raise PipelineError(
                f"{path}: image size {im.size[0]}x{im.size[1]} differs from the dataset's "
                f"{size[0]}x{size[1]}"
            )
        if im.mode != mode:
            raise PipelineError(f"{path}: image mode {im.mode} differs from the dataset's {mode}")
        return im.tobytes()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot decode image ({exc})") from exc


def _decode_chunk(
    out_path: str, offset: int, start: int, files: list[str], size: tuple[int, int], mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``files`` into rows ``start..`` of the ``.npy`` output, whose data begins at
    byte ``offset``: one positioned write per chunk (no memory map, so a worker's memory is
    its chunk; ``atomic_dir`` fsyncs each file once before the output is renamed into place).

    Returns per-channel sums and sums of squares for normalisation stats, so no
    pixel data travels back to the parent process.
    """
    channels = _channels(mode)
    block = np.empty((len(files), size[1], size[0], channels), dtype=np.uint8)
    rows = memoryview(block).cast("B")
    step = block[0].nbytes
    for i, name in enumerate(files):
        rows[i * step : (i + 1) * step] = _decode_pixels(name, size, mode)
    fd = os.open(out_path, os.O_WRONLY)
    try:
        view, position = rows, offset + start * step
        while view:  # pwrite may write less than asked
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
    finally:
        os.close(fd)
    flat = block.reshape(-1, channels)
    total = flat.sum(axis=0, dtype=np.float64)
    total_sq = np.square(flat, dtype=np.uint32).sum(axis=0, dtype=np.float64)
    return total, total_sq


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _decode_all(
    splits: dict[str, RawSplit], out_dir: Path, size: tuple[int, int], mode: str, workers: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode every split into ``<split>_images.npy`` with one pool of ``workers`` processes.

    Small chunks from all splits share one queue, so no core idles at a split's tail.
    Returns per-split (sum, sum of squares) per channel.
    """
    from tqdm import tqdm

    channels = _channels(mode)
    total_images = sum(len(split) for split in splits.values())
    chunk = max(256, min(2048, math.ceil(total_images / (workers * 24))))
    outputs = {}
    for name, split in splits.items():
        path = out_dir / f"{name}_images.npy"
        shape = (len(split), size[1], size[0], channels)
        # Creating the memory map writes the header and sizes the file; workers then write
        # their rows at the data offset.
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        outputs[name] = (str(path), header.offset)
        del header

    def tasks() -> Iterator[tuple[str, str, int, int, list[str]]]:
        # Paths are built chunk by chunk as work is handed out: never all at once.
        for name, split in splits.items():
            path, offset = outputs[name]
            for start in range(0, len(split), chunk):
                yield name, path, offset, start, split.paths(start, start + chunk)

    stats = {name: (np.zeros(channels), np.zeros(channels)) for name in splits}

    def add(name: str, result: tuple[np.ndarray, np.ndarray]) -> None:
        stats[name][0][:] += result[0]
        stats[name][1][:] += result[1]

    with tqdm(total=total_images, unit="img", desc="decode", disable=None, leave=False) as bar:
        if workers <= 1 or total_images <= chunk:
            for name, path, offset, start, files in tasks():
                add(name, _decode_chunk(path, offset, start, files, size, mode))
                bar.update(len(files))
            return stats
        pending = tasks()
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # A bounded window of chunks in flight: memory stays flat however many images.
            running: dict = {}

            def submit_next() -> None:
                for name, path, offset, start, files in itertools.islice(pending, 1):
                    future = pool.submit(_decode_chunk, path, offset, start, files, size, mode)
                    running[future] = (name, len(files))

            for _ in range(workers * 3):
                submit_next()
            try:
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        name, count = running.pop(future)
                        add(name, future.result())
                        bar.update(count)
                        submit_next()
            except BaseException:
                for future in running:
                    future.cancel()
                raise
    return stats


def process_dataset(
    raw_data_dir_path: str | os.PathLike[str],
    processed_data_dir_path: str | os.PathLike[str],
    num_workers: int = 0,
) -> dict:
    """Validate the raw dataset, decode it on all cores and write the processed arrays.

    Everything is written into a temp directory that replaces the output only
    when complete, so a failure leaves the previous output untouched.
    Returns the metadata written to ``metadata.json``.
    """
    splits = read_raw_dataset(raw_data_dir_path)
    classes = _sort_labels(set(splits["train"].label_names))
    index = {label: i for i, label in enumerate(classes)}
    reference = _open_image(Path(splits["train"].path(0)))
    size, mode = reference.size, reference.mode
    channels = _channels(mode)
    workers = num_workers if num_workers > 0 else available_cpus()
    log.info(
        "processing %s: %s, %d classes, %dx%d %s, %d workers",
        raw_data_dir_path,
        ", ".join(f"{s.name}={len(s)}" for s in splits.values()),
        len(classes),
        size[0],
        size[1],
        mode,
        workers,
    )

    meta_splits: dict[str, dict] = {}
    with atomic_dir(processed_data_dir_path) as tmp:
        stats = _decode_all(splits, tmp, size, mode, workers)
        for name, split in splits.items():
            to_class = np.array([index[label] for label in split.label_names], dtype=np.int64)
            codes = np.frombuffer(split.codes, dtype=np.intc)
            np.save(tmp / f"{name}_labels.npy", to_class[codes])
            counts = dict(
                zip(
                    split.label_names,
                    np.bincount(codes, minlength=len(split.label_names)),
                    strict=True,
                )
            )
            meta_splits[name] = {
                "count": len(split),
                "images": f"{name}_images.npy",
                "labels": f"{name}_labels.npy",
                "class_counts": {label: int(counts.get(label, 0)) for label in classes},
            }
        total, total_sq = stats["train"]
        pixels = len(splits["train"]) * size[0] * size[1]
        mean = total / pixels / 255.0
        var = np.maximum(total_sq / pixels / 255.0**2 - mean**2, 0.0)
        std = np.maximum(np.sqrt(var), 1e-6)  # a constant channel must not divide by zero
        metadata = {
            "format_version": FORMAT_VERSION,
            "classes": classes,
            "num_classes": len(classes),
            "image_shape": [channels, size[1], size[0]],
            "mode": mode,
            "splits": meta_splits,
            "normalization": {
                "mean": [round(float(m), 8) for m in mean],
                "std": [round(float(s), 8) for s in std],
            },
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    log.info(
        "wrote %s (%s)",
        processed_data_dir_path,
        ", ".join(f"{k}={v['count']}" for k, v in meta_splits.items()),
    )
    return metadata


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W, C), usually a read-only memory map
    labels: np.ndarray  # int64 (N,)


@dataclass(frozen=True)
class ProcessedData:
    classes: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    test: Split


def load_processed(processed_dir: str | os.PathLike[str]) -> ProcessedData:
    """Open the processed arrays memory-mapped; nothing is read until used."""
    root = Path(processed_dir)
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise PipelineError(
            f"processed data not found: {meta_path} (run `make process-data` or `dvc repro`)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise PipelineError(
                f"{meta_path}: format_version {meta.get('format_version')} is not "
                f"{FORMAT_VERSION}; re-run process_data"
            )
        splits = {}
        for name in REQUIRED_SPLITS:
            entry = meta["splits"][name]
            images = np.load(root / entry["images"], mmap_mode="r")
            labels = np.load(root / entry["labels"], mmap_mode="r")
            if len(images) != len(labels) or len(images) != entry["count"]:
                raise PipelineError(
                    f"{root}: {name} arrays disagree with {METADATA_FILE}; re-run process_data"
                )
            splits[name] = Split(images, labels)
        return ProcessedData(
            classes=list(meta["classes"]),
            image_shape=tuple(meta["image_shape"]),
            mean=tuple(meta["normalization"]["mean"]),
            std=tuple(meta["normalization"]["std"]),
            train=splits["train"],
            test=splits["test"],
        )
    except (KeyError, TypeError, json.JSONDecodeError, ValueError, OSError) as exc:
        raise PipelineError(
            f"{root}: processed data is incomplete or corrupt ({exc}); re-run process_data"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imgpipe.data OUT_DIR``: export the sample digits into OUT_DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m imgpipe.data", description=main.__doc__)
    parser.add_argument("out_dir", help="where to write the raw layout, e.g. data/raw")
    args = parser.parse_args(argv)
    count = export_sample_digits(args.out_dir)
    print(f"wrote {count} sample digits to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
