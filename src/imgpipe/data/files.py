"""Which files of a raw dataset may be read, which are of formats it skips, and how an
image is opened.

A dataset downloaded from elsewhere is untrusted input. Three rules hold before
any byte of an image is decoded:

- only regular files inside the raw folder are read; a symbolic link may lead
  into DVC's cache (DVC's ``symlink`` cache type makes every file one), nowhere
  else. Links are resolved and the target's type is checked with ``stat``,
  which never blocks, so a link to a FIFO is refused instead of opened;
- the extension names the one Pillow decoder that may read a file
  (``IMAGE_FORMATS``) and the content must be of that format: Pillow's own
  format detection would hand EPS content to Ghostscript;
- the size declared in the header is checked against ``max_image_pixels``
  before the pixels are decoded (a 20000x20000 PNG is 48 KB on disk).

The fast decoders (``decoders``) keep all three: they read only files the guard let
through, only content of their format, and check the header's size first.
"""

from __future__ import annotations

import configparser
import functools
import logging
import os
import stat
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from imgpipe.errors import PipelineError

# The one mapping from a file's extension to the Pillow format that decodes it.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
IMAGE_SUFFIXES = tuple(IMAGE_FORMATS)

# Pillow's own threshold (Image.MAX_IMAGE_PIXELS): about 256 MiB of RGB pixels.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def image_format(name: str) -> str | None:
    """The Pillow format a file name's extension stands for, None when unsupported."""
    return IMAGE_FORMATS.get(os.path.splitext(name)[1].lower())


# --------------------------------------------------------------------------- where files lead


def _dvc_dirs(start: str) -> Iterable[str]:
    """The ``.dvc`` folder of the DVC repository enclosing ``start``, if any."""
    folder = start
    while True:
        candidate = os.path.join(folder, ".dvc")
        if os.path.isdir(candidate):
            yield candidate
            return
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _configured_cache(dvc_dir: str) -> str | None:
    """``cache.dir`` from the repository's own config files (``dvc cache dir``); the
    user's global and system DVC configs are not read."""
    found = None
    for name in ("config", "config.local"):  # the local file wins, as in DVC
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read(os.path.join(dvc_dir, name), encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            continue  # DVC itself would refuse this file; the default cache still counts
        value = parser.get("cache", "dir", fallback=None)
        if value:
            found = os.path.join(dvc_dir, os.path.expanduser(value.strip().strip("'\"")))
    return found


def dvc_cache_dirs(raw_dir: str) -> list[str]:
    """Resolved cache folders of the DVC repository that holds ``raw_dir``."""
    caches: set[str] = set()
    for start in {os.path.abspath(raw_dir), os.path.realpath(raw_dir)}:
        for dvc_dir in _dvc_dirs(start):
            caches.add(os.path.realpath(os.path.join(dvc_dir, "cache")))
            custom = _configured_cache(dvc_dir)
            if custom:
                caches.add(os.path.realpath(custom))
    return sorted(caches)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class DatasetGuard:
    """Decides, before anything is opened, whether a path of the raw folder may be read."""

    def __init__(self, raw_dir: str | os.PathLike[str]) -> None:
        self.raw_dir = os.fspath(raw_dir)
        self.root = os.path.realpath(self.raw_dir)
        self.caches = dvc_cache_dirs(self.raw_dir)
        # Resolved folders of link targets: DVC's links share a few hundred folders, so
        # one ``lstat`` per link replaces a full ``realpath`` walk.
        self._folders: dict[str, str] = {}

    def folder_refusal(self, path: str) -> str | None:
        """Why the folder at ``path`` may not be listed (None when it may): folders are
        read only when they resolve inside the raw folder (DVC's cache holds no folders)."""
        real = os.path.realpath(path)
        if not _inside(real, self.root):
            return f"leads outside {self.raw_dir} (to {real})"
        return None

    def _resolve(self, link: str) -> tuple[str, int]:
        """The resolved target of a link and its ``stat`` mode (``lstat`` and ``stat`` never block)."""
        target = os.path.join(os.path.dirname(link), os.readlink(link))
        folder, name = os.path.split(target)
        if name not in ("", ".", ".."):
            real_folder = self._folders.get(folder)
            if real_folder is None:
                real_folder = self._folders[folder] = os.path.realpath(folder)
            real = os.path.join(real_folder, name)
            mode = os.lstat(real).st_mode
            if not stat.S_ISLNK(mode):
                return real, mode
        real = os.path.realpath(link)  # a chain of links: walk it all
        return real, os.stat(real).st_mode

    def link_refusal(self, path: str) -> str | None:
        """Why the symbolic link at ``path`` may not be read as a file (None when it may)."""
        try:
            real, mode = self._resolve(path)
        except OSError as exc:
            return f"is a broken link ({exc.strerror})"
        if not (_inside(real, self.root) or any(_inside(real, c) for c in self.caches)):
            return f"leads outside {self.raw_dir} (to {real}); only links into DVC's cache are read"
        if not stat.S_ISREG(mode):
            return f"leads to {real}, which is not a regular file"
        return None

    def file_refusal(self, path: str) -> str | None:
        """Why the entry at ``path`` may not be read as a file (None when it may)."""
        try:
            mode = os.lstat(path).st_mode
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if stat.S_ISLNK(mode):
            return self.link_refusal(path)
        return None if stat.S_ISREG(mode) else "is not a regular file"


def unusable_char(text: str) -> str | None:
    """What makes ``text`` unusable as a path part: a control character (NUL, a newline,
    a tab, ESC...; Unicode's Cc class) or a lone surrogate, named with its code point."""
    for at, char in enumerate(text):
        if unicodedata.category(char) in ("Cc", "Cs"):
            return f"the control character U+{ord(char):04X} at position {at + 1}"
    return None


@dataclass
class Unsupported:
    """Files of formats this project does not decode, found in class folders: file names
    per folder. Hidden files (``.DS_Store``) and sub-folders are not counted."""

    # skip: one warning for the whole dataset (counts per extension, the folders);
    # error: the same as one line, before any work.
    POLICIES = ("skip", "error")

    by_folder: dict[str, list[str]] = field(default_factory=dict)

    def add(self, folder: str, name: str) -> None:
        self.by_folder.setdefault(folder, []).append(name)

    def report(self, policy: str) -> None:
        """One warning naming how many files, of which extensions, under which folders;
        with ``policy`` ``error``, the same as one PipelineError instead."""
        if not self.by_folder:
            return
        names = [n for files in self.by_folder.values() for n in files]
        kinds = Counter(os.path.splitext(n)[1].lower() or "(no extension)" for n in names)
        folders = sorted(self.by_folder)
        shown = ", ".join(folders[:5]) + (
            f" and {len(folders) - 5} more" if len(folders) > 5 else ""
        )
        first = os.path.join(folders[0], sorted(self.by_folder[folders[0]])[0])
        what = (
            f"{len(names)} file(s) of unsupported formats "
            f"({', '.join(f'{ext}: {n}' for ext, n in sorted(kinds.items()))}) "
            f"under {shown} (e.g. {first!r}); supported: {', '.join(IMAGE_SUFFIXES)}"
        )
        if policy == "error":
            raise PipelineError(
                f"{what}: convert or remove them, or set unsupported_files=skip to skip them"
            )
        logging.getLogger("imgpipe.data").warning(
            "skipped %s (unsupported_files=error makes this an error)", what
        )


# --------------------------------------------------------------------------- opening an image


@functools.cache
def _plugin(fmt: str) -> tuple[Callable[..., Any], Callable[[bytes], Any] | None]:
    """Pillow's (factory, accept) pair for one format: the factory parses the header of
    that format only and refuses other content, with no detection and no size check."""
    from PIL import Image

    Image.preinit()
    if fmt not in Image.OPEN:
        Image.init()
    return Image.OPEN[fmt]


def _content_format(path: str) -> str | None:
    """The supported format whose signature the file starts with, if any."""
    with open(path, "rb") as fh:
        return content_format(fh.read(16))


def content_format(prefix: bytes) -> str | None:
    """The supported format whose signature ``prefix`` (a file's first bytes) starts with."""
    for fmt in dict.fromkeys(IMAGE_FORMATS.values()):
        accept = _plugin(fmt)[1]
        if accept is not None and accept(prefix):
            return fmt
    return None


def open_image(path: str, max_pixels: int) -> Any:
    """Open ``path`` with the decoder its extension names and check the header's size.

    Returns Pillow's lazily decoding image (use it as a context manager); nothing but the
    header has been read. ``max_pixels`` 0 means no limit. ``path`` is a string: Pillow
    opens a ``pathlib.Path`` more slowly.
    """
    fmt = image_format(path)
    if fmt is None:
        raise PipelineError(
            f"{path}: unsupported image format (supported: {', '.join(IMAGE_SUFFIXES)})"
        )
    return _open_as(path, path, fmt, max_pixels)


def open_image_data(data: bytes, fmt: str, name: str, max_pixels: int) -> Any:
    """``open_image`` for an image held in memory (an upload, never written to disk):
    ``fmt`` (a value of ``IMAGE_FORMATS``) is what the sender declared, and the content
    must be of it; ``name`` names the image in errors."""
    import io

    return _open_as(io.BytesIO(data), name, fmt, max_pixels, prefix=data[:16])


def _open_as(source: Any, path: str, fmt: str, max_pixels: int, prefix: bytes | None = None) -> Any:
    try:
        im = _plugin(fmt)[0](source)
    except SyntaxError as exc:
        actual = _content_format(path) if prefix is None else content_format(prefix)
        if actual is not None and actual != fmt:
            suffix = next(s for s, f in IMAGE_FORMATS.items() if f == actual)
            raise PipelineError(
                f"{path}: cannot decode image as {fmt}: its content is {actual} "
                f"(rename it to {suffix})"
            ) from exc
        raise PipelineError(f"{path}: cannot decode image as {fmt} ({exc})") from exc
    try:
        check_pixels(path, *im.size, max_pixels)
    except PipelineError:
        im.close()
        raise
    return im


def check_pixels(path: str, width: int, height: int, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` (0: no limit)."""
    if max_pixels and width * height > max_pixels:
        raise PipelineError(
            f"{path}: image header declares {width}x{height} = {width * height} pixels, "
            f"more than max_image_pixels={max_pixels}"
        )
