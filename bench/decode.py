"""Decoding benchmark: the decoders' tight loops, and process_data against them.

Usage (from the project root):
    python -m bench decode            # 30,000 28x28 grey PNGs, 5,000 128x128 RGB JPEGs,
                                      # 1,000 photos each of 500x375 and 2,000x1,500
    python -m bench decode --smoke    # tiny sizes, every row, seconds; writes no RESULTS.md

For each kind of image, in one run on the same files:
- each decoder's tight loop on one core (read the file, decode, nothing else): Pillow's
  own decoder opened directly, pyspng (libspng), simplejpeg (libjpeg-turbo), OpenCV's
  codecs when opencv-python-headless is installed (it is not a dependency), and whether
  its pixels equal Pillow's on every file;
- process_data against the decode limit (the fastest decoder's tight loop on all cores,
  bench/baselines.py) and against Pillow-only process_data (``fast_decoders=False``, the
  processing this project had before the fast decoders).
For photos resized to 224x224 (``image_size``), process_data against the limit for the
same output: the fastest decoder at the reduced DCT scale plus the same Pillow resize, in
a tight loop on every core; beside it the decode alone at that scale, the full-size
decode plus resize (what the same output cost before DCT scaling), and how far the pixels
are from a full-size decode plus resize.
The section "Decoding" of bench/RESULTS.md is rewritten (bench/sections.py).
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from bench import baselines, sections
from bench.dataset import generate
from bench.measure import best_of_turns, process_rate
from bench.photos import (
    PHOTO_SIZES,
    PROCESS_VS_LIMIT,
    generate_digit_jpegs,
    generate_photos,
    measure_photos,
    photo_rows,
)
from bench.sections import BENCH
from imgpipe.cpus import available_cpus

TOPIC = "decoding"
PROCESS_VS_PILLOW = 1.3


def paint_tinted(
    digit: np.ndarray, i: int, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Photo-like content: the digit upscaled, tinted, over a gradient, noised."""
    from PIL import Image

    digit = np.asarray(Image.fromarray(digit).resize(xx.shape[::-1], Image.BILINEAR))
    tint = rng.integers(60, 256, 3)
    background = np.stack([(xx + yy + 40 * c + i) % 256 for c in range(3)], -1) // 3
    pixels = background + digit[..., None].astype(np.int32) * tint // 255
    return np.clip(pixels + rng.integers(0, 16, pixels.shape), 0, 255).astype(np.uint8)


def generate_jpegs(root: Path, count: int, size: int, workers: int) -> None:
    """An ImageFolder layout (no CSV) of ``count`` RGB JPEGs of ``size`` x ``size``."""
    generate_digit_jpegs(root, count, (size, size), workers, paint_tinted)


# --------------------------------------------------------------------------- decoders


def _pyspng(name: str) -> np.ndarray:
    import pyspng

    return pyspng.load(baselines.read_file(name))


def _simplejpeg(name: str) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(baselines.read_file(name))


def _opencv(name: str) -> np.ndarray:
    import cv2

    pixels = cv2.imread(name, cv2.IMREAD_UNCHANGED)
    return pixels[..., ::-1] if pixels.ndim == 3 else pixels  # BGR -> RGB


def _pillow_memory(data: bytes) -> bytes:
    from PIL import JpegImagePlugin, PngImagePlugin

    png = data.startswith(b"\x89PNG")
    plugin = PngImagePlugin.PngImageFile if png else JpegImagePlugin.JpegImageFile
    with plugin(io.BytesIO(data)) as im:
        return im.tobytes()


def _pyspng_memory(data: bytes) -> np.ndarray:
    import pyspng

    return pyspng.load(data)


def _simplejpeg_memory(data: bytes) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(data)


def _opencv_memory(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


# Each decoder from bytes already in memory: the decode alone, without the file's reading.
FROM_MEMORY = {
    "Pillow": _pillow_memory,
    "pyspng": _pyspng_memory,
    "simplejpeg": _simplejpeg_memory,
    "OpenCV": _opencv_memory,
}


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def decoders(kind: str) -> dict[str, Callable[[str], object]]:
    found: dict[str, Callable[[str], object]] = {"Pillow": baselines.pillow_decode}
    if kind == "png" and _installed("pyspng"):
        found["pyspng"] = _pyspng
    if kind == "jpeg" and _installed("simplejpeg"):
        found["simplejpeg"] = _simplejpeg
    if _installed("cv2"):
        import cv2

        cv2.setNumThreads(1)  # one core, as every other tight loop
        found["OpenCV"] = _opencv
    return found


def _pillow_pixels(name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(name) as im:
        return np.asarray(im)


def _one_pass(decode: Callable, inputs: list) -> float:
    start = time.perf_counter()
    for item in inputs:
        decode(item)
    return len(inputs) / (time.perf_counter() - start)


def tight_loops(found: dict[str, Callable], inputs: list, repeats: int) -> dict[str, float]:
    """Images per second on one core, each decoder's best of ``repeats`` passes over
    ``inputs``, the decoders taking turns."""
    runs = {label: partial(_one_pass, decode, inputs) for label, decode in found.items()}
    return best_of_turns(runs, repeats)


def identical(decode: Callable[[str], object], names: list[str]) -> bool:
    for name in names:
        pixels = decode(name)
        if isinstance(pixels, bytes):
            continue  # Pillow itself
        if not np.array_equal(np.asarray(pixels), _pillow_pixels(name)):
            return False
    return True


# --------------------------------------------------------------------------- processing


def measure(kind: str, raw: Path, work: Path, sample: int, repeats: int, cpus: int) -> dict:
    """Tight loops on ``sample`` files, then the decode limit and process_data with and
    without the fast decoders on all of them: best of ``repeats`` each, taking turns."""
    files = sorted(str(p) for p in raw.rglob("*.png" if kind == "png" else "*.jpg"))
    names = files[:sample]
    found = decoders(kind)
    speeds = tight_loops(found, names, 2 * repeats + 1)  # cheap: more turns, less noise
    data = [baselines.read_file(name) for name in names]
    in_memory = tight_loops({k: FROM_MEMORY[k] for k in found}, data, 2 * repeats + 1)
    loops = {
        label: {
            "ips": speeds[label],
            "memory_ips": in_memory[label],
            "identical": identical(decode, names),
        }
        for label, decode in found.items()
    }
    runs = {
        "limit": partial(baselines.decode_limit, [Path(f) for f in files], cpus),
        "fast": partial(process_rate, raw, work / "processed-fast", len(files)),
        "pillow": partial(
            process_rate, raw, work / "processed-pillow", len(files), fast_decoders=False
        ),
    }
    best = best_of_turns(runs, repeats)
    return {
        "files": len(files),
        "sample": len(names),
        "loops": loops,
        "decode_limit_ips": best["limit"],
        "processing": {
            "images": len(files),
            "fast_ips": best["fast"],
            "pillow_ips": best["pillow"],
        },
    }


def rows_of(kind: str, title: str, m: dict) -> list[sections.Row]:
    rows: list[sections.Row] = []
    pillow = m["loops"]["Pillow"]
    for name, loop in m["loops"].items():
        same = "identical to Pillow" if loop["identical"] else "DIFFERENT pixels"
        rows.append(
            (
                f"{title}: {name} tight loop, one core",
                f"{loop['ips']:,.0f} img/s from files = {loop['ips'] / pillow['ips']:.2f}x "
                f"Pillow; {loop['memory_ips']:,.0f} from memory = "
                f"{loop['memory_ips'] / pillow['memory_ips']:.2f}x; {same} ({m['sample']:,} files)",
                "-",
                "-",
            )
        )
    p = m["processing"]
    vs_limit = p["fast_ips"] / m["decode_limit_ips"]
    vs_pillow = p["fast_ips"] / p["pillow_ips"]
    rows.append(
        (
            f"{title}: process_data vs decode limit",
            f"{p['fast_ips']:,.0f} vs {m['decode_limit_ips']:,.0f} img/s = {vs_limit:.2f}x "
            f"({p['images']:,} images)",
            f">= {PROCESS_VS_LIMIT}x",
            "met" if vs_limit >= PROCESS_VS_LIMIT else "MISSED",
        )
    )
    rows.append(
        (
            f"{title}: process_data vs Pillow-only process_data",
            f"{p['fast_ips']:,.0f} vs {p['pillow_ips']:,.0f} img/s = {vs_pillow:.2f}x",
            f">= {PROCESS_VS_PILLOW}x",
            "met" if vs_pillow >= PROCESS_VS_PILLOW else "MISSED",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pngs", type=int, default=30_000, help="28x28 grey PNGs generated")
    parser.add_argument("--jpegs", type=int, default=5_000, help="128x128 RGB JPEGs generated")
    parser.add_argument("--photos", type=int, default=1_000, help="photos of each size generated")
    parser.add_argument(
        "--only-photos", action="store_true", help="only the photo rows (printed, not written)"
    )
    parser.add_argument("--sample", type=int, default=3_000, help="files per tight loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no RESULTS.md")
    parser.add_argument("--out", type=Path, default=BENCH, help="where RESULTS.md is")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pngs, args.jpegs, args.sample, args.repeats, args.photos = 600, 120, 100, 1, 24
    cpus = available_cpus()
    work = Path(tempfile.mkdtemp(prefix="imgpipe-decode-"))
    started = time.perf_counter()
    try:
        kinds = {"png": ("28x28 grey PNG", args.pngs), "jpeg": ("128x128 RGB JPEG", args.jpegs)}
        results: dict = {"cpus": cpus, "args": {k: str(v) for k, v in vars(args).items()}}
        rows: list[sections.Row] = []
        if args.only_photos:
            kinds = {}
        for kind, (title, count) in kinds.items():
            raw = work / f"raw-{kind}"
            print(f"generating {count:,} {title}s ...", flush=True)
            if kind == "png":
                generate(raw, count, 28, cpus)  # the main benchmark's images (with CSVs)
            else:
                generate_jpegs(raw, count, 128, cpus)
            print(f"measuring {title} ...", flush=True)
            m = measure(kind, raw, work, args.sample, args.repeats, cpus)
            results[kind] = m
            rows += rows_of(kind, title, m)
            shutil.rmtree(raw)
        for label, size in PHOTO_SIZES.items():
            title = f"{label} RGB JPEG photo to 224x224"
            raw = work / f"raw-photos-{label}"
            print(f"generating {args.photos:,} {label} photos ...", flush=True)
            generate_photos(raw, args.photos, size, cpus)
            print(f"measuring {title} ...", flush=True)
            results[f"photos-{label}"] = m = measure_photos(raw, work, args.repeats, cpus)
            rows += photo_rows(title, m)
            shutil.rmtree(raw)
        results["seconds"] = time.perf_counter() - started
        width = max(len(r[0]) for r in rows)
        for measure_, value, target, state in rows:
            print(f"{measure_:<{width}}  {value:<72}  {target:<8}  {state}")
        print(f"decode bench took {results['seconds']:.0f}s")
        intro = (
            f"`python -m bench decode` ({results['seconds']:.0f} s, {cpus} cores): tight loops read "
            "and decode each file on one core; the decode limit is the fastest decoder's loop on "
            "every core; process_data runs with the fast decoders and with Pillow alone, best of "
            f'{args.repeats}, alternating. Notes: bench/NOTES.md, "Decoding".'
        )
        if args.only_photos:
            pass
        elif not args.smoke:
            sections.write_section(TOPIC, "Decoding", intro, rows, results, args.out / "RESULTS.md")
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            sections.write_section(TOPIC, "Decoding", intro, rows, results, args.out / "smoke.md")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
