"""The sample dataset: scikit-learn's handwritten digits exported into the raw layout.

``imgpipe data sample OUT_DIR`` (``make data``) runs ``export_sample_digits``. The export is
byte-for-byte the same on every machine, because ``data.dvc`` holds its hashes.
"""

from __future__ import annotations

import csv
import hashlib
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgpipe.atomic import atomic_dir

SAMPLE_SEED = 20241127
SAMPLE_TEST_FRACTION = 0.2


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
