"""The benchmark's dataset: the sample digits resampled and jittered into a raw layout of any
size (deterministic: image i is the same on every machine), and cuts of it."""

from __future__ import annotations

import csv
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from imgpipe.data.processed import write_subset


def _write_images(args: tuple[str, int, int, int, int]) -> None:
    """Resample and jitter sample digits into ``size`` x ``size`` PNGs (deterministic)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root, start, stop, size, test_every = args
    digits = load_digits()
    base = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        src = i % len(base)
        im = Image.fromarray(base[src]).resize((size - 4, size - 4), Image.BILINEAR)
        canvas = np.zeros((size, size), dtype=np.uint8)
        dy, dx = rng.integers(0, 5, 2)
        canvas[dy : dy + size - 4, dx : dx + size - 4] = np.asarray(im)
        noise = rng.integers(0, 24, (size, size), dtype=np.uint8)
        pixels = np.clip(canvas.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        # Runs of ten in a row go to test: the digits' labels cycle, so every class has
        # test images at any count (``i % 6`` alone picks even labels only below 1797).
        split = "test" if (i // 10) % test_every == 0 else "train"
        label = int(digits.target[src])
        path = Path(root) / split / str(label) / f"{i:07d}.png"
        Image.fromarray(pixels).save(path, compress_level=6)


def generate(root: Path, count: int, size: int, workers: int) -> None:
    """The raw layout with ``count`` images, 1 in 6 in test."""
    for split in ("train", "test"):
        for label in range(10):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
    chunk = max(1, count // (workers * 4))
    jobs = [(str(root), s, min(count, s + chunk), size, 6) for s in range(0, count, chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write_images, jobs))
    for split in ("train", "test"):
        rows = sorted(
            (str(p.relative_to(root)), p.parent.name) for p in (root / split).rglob("*.png")
        )
        with open(root / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(("filepath", "label"))
            writer.writerows(rows)


def subset(processed: Path, out: Path, n_train: int, n_test: int) -> Path:
    """A processed dataset with the first ``n_train``/``n_test`` images of each split."""
    return write_subset(processed, out, n_train, n_test)


def raw_files(raw: Path, split: str, limit: int | None = None) -> tuple[list[Path], list[int]]:
    rows = (raw / f"{split}.csv").read_text().splitlines()[1:]
    rows = rows[:limit] if limit else rows
    return [raw / r.split(",")[0] for r in rows], [int(r.split(",")[1]) for r in rows]
