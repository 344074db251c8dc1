"""Photos resized down (``image_size``): the rows bench/decode.py adds for them.

process_data decodes a JPEG that is resized down at a reduced DCT scale first
(imgpipe.data.decoders.dct_scale), then resizes it. Its limit *for the same output* is
the fastest decoder (simplejpeg) at that scale plus the same Pillow resize, in a tight
loop on every core; beside it the decode alone, and the full-size decode plus resize that
the same target cost before, with how far apart their pixels are.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from bench import baselines, sections
from bench.measure import best_of_turns, pool_rate, process_rate

# Targets shared with the other decoding rows.
PROCESS_VS_LIMIT = 0.85


# What paints the n-th image: (the sample digit, n, a generator seeded with n, the x and y
# pixel grids of the image) -> its RGB pixels. A module-level function: it goes to workers.
Painter = Callable[[np.ndarray, int, np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _write_digit_jpegs(args: tuple[str, int, int, tuple[int, int], Painter]) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    root, start, stop, (width, height), paint = args
    digits = load_digits()
    base = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(start, stop):
        src = i % len(base)
        pixels = paint(base[src], i, np.random.default_rng(i), xx, yy)
        split = "test" if i % 6 == 0 else "train"
        path = Path(root) / split / str(int(digits.target[src])) / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def generate_digit_jpegs(
    root: Path, count: int, size: tuple[int, int], workers: int, paint: Painter
) -> None:
    """An ImageFolder layout (no CSV) of ``count`` JPEGs of ``size`` (w, h), 1 in 6 in test:
    the sample digits painted by ``paint``, quality 90, 4:2:0 (deterministic)."""
    chunk = max(1, count // (workers * 4))
    jobs = [(str(root), s, min(count, s + chunk), size, paint) for s in range(0, count, chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write_digit_jpegs, jobs))


def paint_photo(
    digit: np.ndarray, i: int, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Photo-like: the digit upscaled over a smooth tinted background, mild sensor-like
    noise."""
    from PIL import Image

    height, width = xx.shape
    digit = np.asarray(Image.fromarray(digit).resize((width, height), Image.BICUBIC))
    tint = rng.integers(60, 256, 3)
    phase = rng.integers(0, 256, 3)
    background = np.stack(
        [(128 + 100 * np.sin((xx + yy * (c + 1)) / (width / 7) + phase[c])) for c in range(3)],
        -1,
    )
    pixels = 0.6 * background + digit[..., None] * tint / 255 * 0.6
    return np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)


def generate_photos(root: Path, count: int, size: tuple[int, int], workers: int) -> None:
    """``count`` photo-like JPEGs of ``size`` (w, h) in an ImageFolder layout."""
    generate_digit_jpegs(root, count, size, workers, paint_photo)


PHOTO_TARGET = (224, 224)  # (width, height), image_size=[224,224]
PHOTO_SIZES = {"500x375": (500, 375), "2000x1500": (2000, 1500)}


def _resize(pixels: np.ndarray) -> bytes:
    from PIL import Image

    from imgpipe.data.process import RESIZE_FILTER

    filt = getattr(Image.Resampling, RESIZE_FILTER)
    return Image.fromarray(pixels).resize(PHOTO_TARGET, filt, reducing_gap=None).tobytes()


def _scaled_decode(name: str) -> np.ndarray:
    """The fastest decoder at the reduced DCT scale process_data uses (dct_scale)."""
    import simplejpeg

    from imgpipe.data.decoders import dct_scale

    data = baselines.read_file(name)
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    s = dct_scale((width, height), PHOTO_TARGET)
    return simplejpeg.decode_jpeg(data, min_height=-(-height // s), min_width=-(-width // s))


def photo_same_output(name: str) -> bytes:
    """What process_data makes of a photo, in the fewest steps: scaled decode + resize."""
    return _resize(_scaled_decode(name))


def photo_full_then_resize(name: str) -> bytes:
    """The same target the way it was made before DCT scaling: full-size decode + resize."""
    import simplejpeg

    return _resize(simplejpeg.decode_jpeg(baselines.read_file(name)))


PHOTO_LOOPS = {
    "same": photo_same_output,
    "decode": _scaled_decode,
    "full": photo_full_then_resize,
}


def _photo_loop(kind: str, names: list[str]) -> int:
    loop = PHOTO_LOOPS[kind]
    for name in names:
        loop(name)
    return len(names)


def photo_limit(kind: str, names: list[str], workers: int) -> float:
    """Images per second of one of ``PHOTO_LOOPS`` on every core, nothing else."""
    return pool_rate(partial(_photo_loop, kind), names, workers)


def pixel_difference(names: list[str]) -> dict:
    """Scaled decode + resize against full-size decode + resize, over ``names``."""
    diffs = [
        np.abs(
            np.frombuffer(photo_same_output(n), np.uint8).astype(np.int16)
            - np.frombuffer(photo_full_then_resize(n), np.uint8)
        )
        for n in names
    ]
    every = np.concatenate(diffs)
    return {"mean": float(every.mean()), "p99": float(np.percentile(every, 99))}


def measure_photos(raw: Path, work: Path, repeats: int, cpus: int) -> dict:
    """Best of ``repeats`` each, taking turns: the three limits and process_data."""
    files = sorted(str(p) for p in raw.rglob("*.jpg"))
    runs = {kind: partial(photo_limit, kind, files, cpus) for kind in PHOTO_LOOPS}
    runs["process"] = partial(
        process_rate, raw, work / "processed-photos", len(files),
        image_size=PHOTO_TARGET[::-1], image_mode="RGB",
    )  # fmt: skip
    best = best_of_turns(runs, repeats)
    return {"files": len(files), "ips": best, "pixels": pixel_difference(files[:50])}


def photo_rows(title: str, m: dict) -> list[sections.Row]:
    ips, px = m["ips"], m["pixels"]
    vs_limit = ips["process"] / ips["same"]
    return [
        (
            f"{title}: process_data vs limit for the same output",
            f"{ips['process']:,.0f} vs {ips['same']:,.0f} img/s = {vs_limit:.2f}x "
            f"({m['files']:,} images; limit: simplejpeg at the reduced scale + the resize)",
            f">= {PROCESS_VS_LIMIT}x",
            "met" if vs_limit >= PROCESS_VS_LIMIT else "MISSED",
        ),
        (
            f"{title}: the reduced-scale decode alone, every core",
            f"{ips['decode']:,.0f} img/s (the resize costs the rest of the limit)",
            "-",
            "-",
        ),
        (
            f"{title}: same output by full-size decode + resize, every core",
            f"{ips['full']:,.0f} img/s: DCT scaling gives {ips['same'] / ips['full']:.2f}x; "
            f"pixels differ by {px['mean']:.2f} on average, {px['p99']:.0f} at the 99th "
            "percentile (of 255)",
            "-",
            "-",
        ),
    ]
