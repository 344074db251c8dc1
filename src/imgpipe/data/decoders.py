"""Fast decoders for the common files, with exactly Pillow's pixels; Pillow for the rest.

``decode_fast`` decodes an 8-bit grayscale or RGB PNG with libspng (pyspng) and a
grayscale or YCbCr JPEG with libjpeg-turbo (simplejpeg): 2-3x Pillow's speed per file on
the benchmark's images (bench/RESULTS.md, "Decoding"). It returns None for anything
else, and the caller decodes the file with Pillow as before, so Pillow's rules and error
messages stay the only ones users meet:

- PNG: only a file that starts with the PNG signature and whose every chunk has a good
  CRC and is one of ``_PNG_PLAIN_CHUNKS``, with bit depth 8, colour type 0 or 2, no
  interlacing (palette, 16-bit, alpha, tRNS, ICC profiles, compressed text and damaged
  files all go to Pillow). pyspng has libspng ignore CRCs, so the scan is what checks
  them;
- JPEG: only a file whose header libjpeg-turbo reads as Gray or YCbCr (CMYK, YCCK and
  Adobe RGB go to Pillow); both decode with the same integer IDCT and fancy upsampling,
  so progressive and every chroma subsampling give Pillow's pixels (tests/test_layouts.py);
- both: the header's size is checked against ``max_image_pixels`` before any pixel is
  decoded, and any decoder error hands the file to Pillow, which names what is wrong.

A missing wheel leaves Pillow alone at work. Neither applies EXIF orientation; nor does
Pillow's loader.

A JPEG that is resized down is decoded at a reduced scale first (``dct_scale``: JPEG's
DCT scaling, 1/2, 1/4 or 1/8, the smallest scale that still leaves the image at least
the target size in both sides; Pillow's ``draft`` rule), then resized as any image. Most
of a large photo's decode is skipped; the pixels differ slightly from a full-size decode
plus resize, and are the same from simplejpeg and Pillow (tests/test_layouts.py), so they
depend on the file and the target alone, never on the decoder or the worker.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
import zlib
from types import ModuleType

import numpy as np

from imgpipe.data.files import IMAGE_FORMATS, check_pixels
from imgpipe.errors import PipelineError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that change no pixel of an 8-bit grey or RGB image, for Pillow or libspng (gamma
# and chromaticities are applied by neither unless asked).
_PNG_PLAIN_CHUNKS = frozenset(
    {b"IHDR", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME", b"tEXt"}
)
_PNG_MODES = {0: "L", 2: "RGB"}  # colour type -> mode
_JPEG_MODES = {"Gray": ("L", "GRAY"), "YCbCr": ("RGB", "RGB")}  # -> (mode, simplejpeg's)
# The suffixes (files.IMAGE_FORMATS) whose format has a fast decoder, without the dot.
_FAST_SUFFIXES = {
    suffix[1:]: fmt for suffix, fmt in IMAGE_FORMATS.items() if fmt in ("PNG", "JPEG")
}
# A larger file is left to Pillow, which streams it instead of holding all its bytes.
_MAX_FAST_BYTES = 64 << 20


@functools.cache
def _module(name: str) -> ModuleType | None:
    try:
        return __import__(name)
    except ImportError:
        return None


def available() -> dict[str, bool]:
    """Which fast decoders are installed, by format."""
    return {"PNG": _module("pyspng") is not None, "JPEG": _module("simplejpeg") is not None}


_IHDR = struct.Struct(">4sIIBBBBB")  # type, width, height, depth, colour, compression...
_CHUNK_HEAD = struct.Struct(">I4s")  # length, type
_U32 = struct.Struct(">I")


def _png_plain(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, mode) of a PNG that libspng may decode as Pillow would, else None."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 33:
        return None
    kind, width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack_from(
        data, 12
    )
    mode = _PNG_MODES.get(colour)
    if kind != b"IHDR" or mode is None or depth != 8 or compression or filtering or interlace:
        return None
    at, end, view = 8, len(data), memoryview(data)
    while at + 12 <= end:
        length, kind = _CHUNK_HEAD.unpack_from(data, at)
        stop = at + 8 + length
        if kind not in _PNG_PLAIN_CHUNKS or stop + 4 > end:
            return None
        # The chunk's type and body against its CRC.
        if zlib.crc32(view[at + 4 : stop]) != _U32.unpack_from(data, stop)[0]:
            return None
        if kind == b"IEND":
            return width, height, mode
        at = stop + 4
    return None  # no IEND: truncated


def _decode_png(path: str, data: bytes, max_pixels: int) -> tuple[np.ndarray, str] | None:
    pyspng = _module("pyspng")
    header = _png_plain(data) if pyspng is not None else None
    if header is None:
        return None
    width, height, mode = header
    check_pixels(path, width, height, max_pixels)
    try:
        pixels = pyspng.load(data, mode)
    except (RuntimeError, ValueError):
        return None
    return pixels, mode


def dct_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The JPEG decode scale denominator (1, 2, 4 or 8) for an image of ``size`` (width,
    height) resized to ``target``: the largest that keeps both sides >= the target's.
    The same rule as Pillow's ``JpegImageFile.draft``, so both decoders agree."""
    most = min(size[0] // target[0], size[1] // target[1])
    return next((s for s in (8, 4, 2) if most >= s), 1)


def _decode_jpeg(
    path: str,
    data: bytes,
    max_pixels: int,
    out: np.ndarray | None,
    reduce_to: tuple[int, int] | None = None,
) -> tuple[np.ndarray, str] | None:
    simplejpeg = _module("simplejpeg")
    if simplejpeg is None or not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    modes = _JPEG_MODES.get(colorspace)
    if modes is None:
        return None
    check_pixels(path, width, height, max_pixels)
    scale = dct_scale((width, height), reduce_to) if reduce_to else 1
    # libjpeg-turbo picks the smallest of its scales (n/8) whose size is >= these: 1/scale.
    height, width = -(-height // scale), -(-width // scale)
    channels = 1 if modes[0] == "L" else 3
    if out is not None and out.shape != (height, width, channels):
        out = None
    try:
        pixels = simplejpeg.decode_jpeg(
            data,
            colorspace=modes[1],
            strict=True,
            buffer=out,
            min_height=height if scale > 1 else 0,
            min_width=width if scale > 1 else 0,
        )
    except ValueError:
        return None
    return (pixels[..., 0] if modes[0] == "L" else pixels), modes[0]


def _read(path: str) -> bytes | None:
    """The file's bytes (None: too large, left to Pillow, which streams it).

    Plain ``os`` calls: a file object costs a fifth of a small PNG's decode. O_NONBLOCK:
    should a FIFO have replaced the file since it was listed, opening it cannot hang.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PipelineError(f"{path} is not a regular file")
        if info.st_size > _MAX_FAST_BYTES:
            return None
        # One read: a file that grew since is left to Pillow; a short read looks truncated
        # to the checks below, and goes to Pillow too.
        data = os.read(fd, info.st_size + 1)
        return None if len(data) > info.st_size else data
    finally:
        os.close(fd)


def decode_fast(
    path: str,
    max_pixels: int,
    out: np.ndarray | None = None,
    reduce_to: tuple[int, int] | None = None,
) -> tuple[np.ndarray, str] | None:
    """Pixels (H, W) or (H, W, 3) uint8 and their mode, L or RGB, or None: use Pillow.

    ``reduce_to`` (width, height): the size the caller resizes to; a JPEG at least twice
    as large is decoded at the reduced scale ``dct_scale`` names (smaller pixels returned).

    A JPEG whose pixels fit ``out`` (H, W, C) exactly is decoded into it, saving two
    copies of each image (a tenth of a 128x128 JPEG's processing); the pixels returned are
    then a view of ``out``. Raises PipelineError when the header declares more than
    ``max_pixels`` (0: no limit).
    """
    _, dot, suffix = path[-5:].lower().rpartition(".")
    fmt = _FAST_SUFFIXES.get(suffix) if dot else None
    if fmt is None:
        return None
    data = _read(path)
    if data is None:
        return None
    if fmt == "PNG":
        return _decode_png(path, data, max_pixels)
    return _decode_jpeg(path, data, max_pixels, out, reduce_to)
