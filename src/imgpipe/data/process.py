"""Processing: decode a validated raw dataset on all cores into the processed format.

``process_dataset`` is the ``process_data`` stage. The pixels of every split go
through one pool of worker processes, each writing its chunk of rows in place
into the images file that ``processed.create_images`` made; the parent only
hands out chunks and adds up the normalisation stats.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.atomic import atomic_dir
from imgpipe.cpus import available_cpus
from imgpipe.data import processed
from imgpipe.data.decoders import decode_fast
from imgpipe.data.files import DEFAULT_MAX_IMAGE_PIXELS, open_image, open_image_data
from imgpipe.data.raw import RawSplit, read_raw_dataset, sort_labels
from imgpipe.data.val_split import VAL_SPLIT, carve_val, describe_carve, describe_raw
from imgpipe.errors import PipelineError

# One logger name for the whole data stage, as its log lines have always carried.
log = logging.getLogger("imgpipe.data")

# What Pillow raises for a damaged file. Its DecompressionBombError (a plain Exception) is
# never reached: open_image checks the limit itself and bypasses Image.open's check.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def _to_dataset_mode(im, path: str):
    """Decode an opened image fully (truncation surfaces here) as mode L or RGB."""
    im.load()
    mode = im.mode
    if mode in ("LA", "RGBA", "PA") or (mode == "P" and "transparency" in im.info):
        raise PipelineError(f"{path}: image has an alpha channel; use grayscale or RGB")
    if mode == "1":
        return im.convert("L")
    if mode == "P":
        return im.convert("RGB")
    if mode not in ("L", "RGB"):
        raise PipelineError(f"{path}: unsupported image mode {mode!r}; use grayscale or RGB")
    return im.copy()


def _reference_image(path: str, max_pixels: int):
    """The first training image, which sets the dataset's size and mode unless set."""
    try:
        with open_image(path, max_pixels) as im:
            return _to_dataset_mode(im, path)
    except DECODE_ERRORS as exc:
        raise PipelineError(f"{path}: cannot decode image ({exc})") from exc


def _channels(mode: str) -> int:
    return 1 if mode == "L" else 3


# How an image is resized when image_size is set: one filter for every image, whatever
# its size, so the result depends on the file alone (never on the worker that decodes it).
RESIZE_FILTER = "BILINEAR"
# Before that resize, a JPEG is decoded at a reduced DCT scale (decoders.dct_scale).
JPEG_SCALING = "JPEG decoded at 1/2, 1/4 or 1/8 scale, the smallest still >= image_size"


@dataclass(frozen=True)
class Target:
    """What every image becomes: ``size`` (width, height) and ``mode``, set by the config
    (``resize``/``convert``: every image is made so) or by the first training image (an
    image that differs is an error)."""

    size: tuple[int, int]
    mode: str
    max_pixels: int
    resize: bool = False
    convert: bool = False
    fast: bool = True  # the fast decoders where they apply (``decoders``); False: Pillow only

    @property
    def reduce_to(self) -> tuple[int, int] | None:
        """The size a JPEG may be decoded towards at a reduced scale (``decoders.dct_scale``)
        before the resize: only when every image is resized to the target."""
        return self.size if self.resize else None

    def draft(self, im) -> None:
        """Pillow's own reduced-scale JPEG decode (before ``load``), by the same rule; a
        no-op for other formats (MPO, a JPEG with more frames, takes it like a JPEG)."""
        if self.resize:
            im.draft(None, self.size)

    def fit(self, im, path: str) -> bytes:
        """An L or RGB image converted, then resized, into the target; or the error."""
        if im.mode != self.mode:
            if not self.convert:
                raise PipelineError(
                    f"{path}: image mode {im.mode} differs from the dataset's {self.mode}"
                )
            im = im.convert(self.mode)
        if im.size != self.size:
            from PIL import Image

            im = im.resize(self.size, getattr(Image.Resampling, RESIZE_FILTER), reducing_gap=None)
        return im.tobytes()

    def check_size(self, got: tuple[int, int], path: str) -> None:
        if got != self.size and not self.resize:
            raise PipelineError(
                f"{path}: image size {got[0]}x{got[1]} differs from the dataset's "
                f"{self.size[0]}x{self.size[1]}"
            )


def _decode_pixels(path: str, target: Target, out: np.ndarray | None = None) -> bytes | None:
    """One image's pixel rows as bytes, in the target's size and mode; other modes are
    converted where they can be, and what cannot is named. None: the pixels were decoded
    straight into ``out`` (H, W, C), the image's row of the chunk.

    Format, pixel limit and size come from the header, before any pixel is decoded. The
    common files go through the fast decoders (``decoders``: Pillow's pixels); Pillow
    decodes the rest. An image already in the dataset's mode goes straight from Pillow's
    decoder to bytes: ``Image.open``'s format probing, and ``np.asarray``'s array
    interface, are a sizeable share of a small PNG's decode (bench/NOTES.md).
    """
    try:
        fast = decode_fast(path, target.max_pixels, out, target.reduce_to) if target.fast else None
        if fast is not None:
            pixels, mode = fast
            got = (pixels.shape[1], pixels.shape[0])
            if got == target.size and mode == target.mode:
                if out is not None and np.may_share_memory(pixels, out):
                    return None  # decoded in place
                return pixels.tobytes()
            target.check_size(got, path)
            from PIL import Image

            return target.fit(Image.fromarray(pixels), path)
        with open_image(path, target.max_pixels) as im:
            return _pillow_pixels(im, path, target)
    except DECODE_ERRORS as exc:
        raise PipelineError(f"{path}: cannot decode image ({exc})") from exc


def decode_image_data(data: bytes, fmt: str, name: str, target: Target) -> bytes:
    """An image held in memory (an upload, never written to disk) as ``_decode_pixels``
    decodes a file: the same rules, Pillow's pixels (which the fast decoders equal), in the
    target's size and mode. ``fmt`` is the format the sender declared."""
    try:
        with open_image_data(data, fmt, name, target.max_pixels) as im:
            return _pillow_pixels(im, name, target)
    except DECODE_ERRORS as exc:
        raise PipelineError(f"{name}: cannot decode image ({exc})") from exc


def _pillow_pixels(im, name: str, target: Target) -> bytes:
    """An opened (not yet loaded) image as ``target``'s bytes, decoded by Pillow: straight
    to bytes when it already is in the target's size and mode, else converted and fitted;
    ``name`` is what an error names."""
    target.check_size(im.size, name)
    target.draft(im)
    if im.mode == target.mode and im.size == target.size:
        return im.tobytes()
    return target.fit(_to_dataset_mode(im, name), name)


def _decode_chunk(
    out_path: str, offset: int, start: int, files: list[str], target: Target, sums: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """Decode ``files`` into rows ``start..`` of the ``.npy`` output, whose data begins at
    byte ``offset``: one positioned write per chunk (no memory map, so a worker's memory is
    its chunk; ``atomic_dir`` fsyncs each file once before the output is renamed into place).

    Returns per-channel sums and sums of squares for normalisation stats when ``sums``
    (train's chunks: the stats are train's alone), so no pixel data travels back to the
    parent process.
    """
    channels = _channels(target.mode)
    width, height = target.size
    block = np.empty((len(files), height, width, channels), dtype=np.uint8)
    rows = memoryview(block).cast("B")
    step = block[0].nbytes
    for i, name in enumerate(files):
        pixels = _decode_pixels(name, target, block[i])
        if pixels is not None:
            rows[i * step : (i + 1) * step] = pixels
    fd = os.open(out_path, os.O_WRONLY)
    try:
        view, position = rows, offset + start * step
        while view:  # pwrite may write less than asked
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
    finally:
        os.close(fd)
    return _pixel_sums(block) if sums else None


def _pixel_sums(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sums and sums of squares of a chunk (N, H, W, C), exactly.

    Summed down the rows of (N, H*W*C), so numpy's inner loop runs along a whole image
    instead of along C values (a (N*H*W, C) sum costs about 8x more: as much as decoding a
    128x128 JPEG); uint32 holds any chunk's sums (a chunk is at most 2,048 images, 255^2 * 2,048
    < 2^32), squares are taken a slice of rows at a time in uint16.
    """
    channels = block.shape[-1]
    rows = block.reshape(len(block), -1)
    total = rows.sum(axis=0, dtype=np.uint32).reshape(-1, channels).sum(axis=0, dtype=np.uint64)
    squares = np.zeros(rows.shape[1], dtype=np.uint32)
    step = max(1, (1 << 17) // max(1, rows.shape[1]))
    buffer = np.empty((min(step, len(rows)), rows.shape[1]), dtype=np.uint16)
    for start in range(0, len(rows), step):
        part = buffer[: len(rows[start : start + step])]
        np.square(rows[start : start + step], out=part, dtype=np.uint16)
        squares += part.sum(axis=0, dtype=np.uint32)
    total_sq = squares.reshape(-1, channels).sum(axis=0, dtype=np.uint64)
    return total.astype(np.float64), total_sq.astype(np.float64)


def _decode_all(
    splits: dict[str, RawSplit], out_dir: Path, target: Target, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every split into its images file with one pool of ``workers`` processes.

    Small chunks from all splits share one queue, so no core idles at a split's tail.
    Returns train's (sum, sum of squares) per channel.
    """
    from imgpipe import progress

    channels = _channels(target.mode)
    width, height = target.size
    total_images = sum(len(split) for split in splits.values())
    chunk = max(256, min(2048, math.ceil(total_images / (workers * 24))))
    outputs = {
        name: processed.create_images(out_dir, name, (len(split), height, width, channels))
        for name, split in splits.items()
    }

    def tasks() -> Iterator[tuple[str, str, int, int, list[str]]]:
        # Paths are built chunk by chunk as work is handed out: never all at once.
        for name, split in splits.items():
            path, offset = outputs[name]
            for start in range(0, len(split), chunk):
                yield name, path, offset, start, split.paths(start, start + chunk)

    stats = (np.zeros(channels), np.zeros(channels))

    def add(result: tuple[np.ndarray, np.ndarray] | None) -> None:
        if result is not None:
            stats[0][:] += result[0]
            stats[1][:] += result[1]

    with progress.bar(total=total_images, unit="img", desc="decode", leave=False) as bar:
        if workers <= 1 or total_images <= chunk:
            for name, path, offset, start, files in tasks():
                add(_decode_chunk(path, offset, start, files, target, name == "train"))
                bar.update(len(files))
            return stats
        pending = tasks()
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # A bounded window of chunks in flight: memory stays flat however many images.
            running: dict = {}

            def submit_next() -> None:
                for name, path, offset, start, files in itertools.islice(pending, 1):
                    future = pool.submit(
                        _decode_chunk, path, offset, start, files, target, name == "train"
                    )
                    running[future] = (name, len(files))

            for _ in range(workers * 3):
                submit_next()
            try:
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        _, count = running.pop(future)
                        add(future.result())
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
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    val_fraction: float = 0.1,
    image_size: tuple[int, int] | None = None,
    image_mode: str | None = None,
    fast_decoders: bool = True,
    unsupported_files: str = "skip",
) -> dict:
    """Validate the raw dataset, decode it on all cores and write the processed arrays.

    Everything is written into a temp directory that replaces the output only
    when complete, so a failure leaves the previous output untouched. An image whose
    header declares more than ``max_image_pixels`` pixels (0: no limit) is refused.
    Without a raw val split, ``val_fraction`` of train becomes val (``val_split``).
    ``image_size`` (height, width) and ``image_mode`` (L or RGB), when set, are what every
    image is converted and then resized to; unset, the first training image sets them and
    any image that differs is an error. ``fast_decoders`` False decodes with Pillow alone
    (the bench's baseline). Files of other formats in class folders are reported once
    (``unsupported_files="skip"``) or refused (``"error"``). Returns the metadata document.
    """
    splits = read_raw_dataset(raw_data_dir_path, unsupported_files)
    # The first image listed in train sets the dataset's size and mode, carved into val or not.
    reference = _reference_image(splits["train"].path(0), max_image_pixels)
    if VAL_SPLIT in splits:
        validation = describe_raw()
    else:
        splits["train"], carved = carve_val(splits["train"], val_fraction)
        splits = {"train": splits["train"], VAL_SPLIT: carved} | splits
        validation = describe_carve(val_fraction)
    classes = sort_labels(set(splits["train"].label_names))
    index = {label: i for i, label in enumerate(classes)}
    target = Target(
        size=(image_size[1], image_size[0]) if image_size else reference.size,
        mode=image_mode or reference.mode,
        max_pixels=max_image_pixels,
        resize=image_size is not None,
        convert=image_mode is not None,
        fast=fast_decoders,
    )
    size, mode = target.size, target.mode
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

    class_counts: dict[str, dict[str, int]] = {}
    with atomic_dir(processed_data_dir_path) as tmp:
        stats = _decode_all(splits, tmp, target, workers)
        for name, split in splits.items():
            to_class = np.array([index[label] for label in split.label_names], dtype=np.int64)
            codes = np.frombuffer(split.codes, dtype=np.intc)
            processed.write_labels(tmp, name, to_class[codes])
            class_counts[name] = dict(
                zip(
                    split.label_names,
                    np.bincount(codes, minlength=len(split.label_names)),
                    strict=True,
                )
            )
        total, total_sq = stats
        pixels = len(splits["train"]) * size[0] * size[1]
        mean = total / pixels / 255.0
        var = np.maximum(total_sq / pixels / 255.0**2 - mean**2, 0.0)
        std = np.maximum(np.sqrt(var), 1e-6)  # a constant channel must not divide by zero
        metadata = processed.build_metadata(
            classes,
            (channels, size[1], size[0]),
            mode,
            class_counts,
            mean,
            std,
            validation=validation,
            preprocessing={
                "image_size": list(image_size) if image_size else None,
                "image_mode": image_mode,
                "resize_filter": f"PIL.Image.Resampling.{RESIZE_FILTER}, reducing_gap=None",
                "jpeg_scaling": JPEG_SCALING if image_size else None,
                "order": "convert to image_mode, then resize to image_size (height, width)",
            },
        )
        processed.write_metadata(tmp, metadata)
    log.info(
        "wrote %s (%s)",
        processed_data_dir_path,
        ", ".join(f"{s.name}={len(s)}" for s in splits.values()),
    )
    return metadata
