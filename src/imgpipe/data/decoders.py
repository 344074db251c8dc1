"""Fast decoders for the common files, with exactly Pillow's pixels; Pillow for the rest.

``decode_fast`` decodes an 8-bit grayscale or RGB PNG with libspng (pyspng) and a
grayscale or YCbCr JPEG with libjpeg-turbo (simplejpeg): 5x and 3x Pillow's speed on
the benchmark's images (bench/RESULTS.md, "Decoding"). It returns None for anything
else, and the caller decodes the file with Pillow as before, so Pillow's rules and error
messages stay the only ones users meet:

- PNG: only a file that starts with the PNG signature and whose every chunk has a good
  CRC and is one of ``_PNG_PLAIN_CHUNKS``, with bit depth 8, colour type 0 or 2, no
  interlacing (palette, 16-bit, alpha, tRNS, ICC profiles, compressed text and damaged
  files all go to Pillow). libspng is told to skip CRCs and ancillary chunks here, so
  the scan is what checks them;
- JPEG: only a file whose header libjpeg-turbo reads as Gray or YCbCr (CMYK, YCCK and
  Adobe RGB go to Pillow); both decode with the same integer IDCT and fancy upsampling,
  so progressive and every chroma subsampling give Pillow's pixels (tests/test_layouts.py);
- both: the header's size is checked against ``max_image_pixels`` before any pixel is
  decoded, and any decoder error hands the file to Pillow, which names what is wrong.

A missing wheel leaves Pillow alone at work. Neither applies EXIF orientation; nor does
Pillow's loader.
"""

from __future__ import annotations

import functools
import struct
import zlib
from types import ModuleType

import numpy as np

from imgpipe.data.files import check_pixels, image_format

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that change no pixel of an 8-bit grey or RGB image, for Pillow or libspng (gamma
# and chromaticities are applied by neither unless asked).
_PNG_PLAIN_CHUNKS = frozenset(
    {b"IHDR", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME", b"tEXt"}
)
_PNG_MODES = {0: "L", 2: "RGB"}  # colour type -> mode
_JPEG_MODES = {"Gray": ("L", "GRAY"), "YCbCr": ("RGB", "RGB")}  # -> (mode, simplejpeg's)
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


def _png_plain(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, mode) of a PNG that libspng may decode as Pillow would, else None."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", data[16:29]
    )
    mode = _PNG_MODES.get(colour)
    if mode is None or depth != 8 or compression or filtering or interlace:
        return None
    at, end, view = 8, len(data), memoryview(data)
    while at + 12 <= end:
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        stop = at + 8 + length
        if kind not in _PNG_PLAIN_CHUNKS or stop + 4 > end:
            return None
        (crc,) = struct.unpack(">I", data[stop : stop + 4])
        if zlib.crc32(view[at + 4 : stop]) != crc:  # the chunk's type and body
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


def _decode_jpeg(path: str, data: bytes, max_pixels: int) -> tuple[np.ndarray, str] | None:
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
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=modes[1], strict=True)
    except ValueError:
        return None
    return (pixels[..., 0] if modes[0] == "L" else pixels), modes[0]


def decode_fast(path: str, max_pixels: int) -> tuple[np.ndarray, str] | None:
    """Pixels (H, W) or (H, W, 3) uint8 and their mode, L or RGB, or None: use Pillow.

    Raises PipelineError when the header declares more than ``max_pixels`` (0: no limit).
    """
    fmt = image_format(path)
    if fmt not in ("PNG", "JPEG"):
        return None
    with open(path, "rb") as fh:
        data = fh.read(_MAX_FAST_BYTES + 1)
    if len(data) > _MAX_FAST_BYTES:
        return None
    if fmt == "PNG":
        return _decode_png(path, data, max_pixels)
    return _decode_jpeg(path, data, max_pixels)
