"""Torch files (checkpoints, model.pt) written whole and read back only when intact.

Every file this project saves with torch is a dict that carries ``content_sha256``: a
SHA-256 over everything else in it, tensors' bytes included (their dtype, shape and
bytes, in the dict's own order). ``torch.load`` does not check the zip's CRCs, so a
byte flipped inside a tensor by disk or cache rot, or a bad copy, loads without a
word; the digest is what notices it. Reading back recomputes the digest from what
was loaded, so it costs one pass over the bytes (about a second per GB of weights).

    save(obj, path)        atomic (temp file, fsync, rename) and sealed with its digest
    load(path)             weights_only load, then the digest checked: a dict you can trust
    load_model_file(path)  the same, for a model.pt a user points at (predict, serve, sync)

Both loads raise ``DamagedFile`` (a PipelineError: one ``error:`` line naming the
file, exit 2) for a file that is unreadable, truncated, holds code, or whose content
no longer matches its digest. Files written before digests existed (checkpoint
format 2, and model.pt files without ``format``) load with one warning, unverified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from imgpipe.atomic import atomic_file
from imgpipe.errors import PipelineError

log = logging.getLogger(__name__)

DIGEST_KEY = "content_sha256"
# Files from this format on must carry the digest: one without it is damaged, not old.
FIRST_SEALED_FORMAT = 3


class DamagedFile(PipelineError):
    """A checkpoint or model file that cannot be trusted; the message names it."""


def content_digest(obj: Any) -> str:
    """SHA-256 over ``obj`` as it loads back: structure, scalars and tensors' bytes."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    # Type tags keep e.g. the string "1" and the int 1, or a list and a tuple, apart.
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{flat.dtype}{tuple(obj.shape)}:".encode())
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():  # pickling keeps the order, so it is part of the content
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}:".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(f"B{len(obj)}:".encode())
        h.update(obj)
    else:  # str, int, float (repr is exact), bool, None, torch.Size, dtypes
        text = repr(obj)
        h.update(f"{type(obj).__name__}{len(text)}:{text}".encode())


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with its digest added (a shallow copy; an old digest is replaced)."""
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    return {**body, DIGEST_KEY: content_digest(body)}


class _KeepWriteError:
    """A file whose failed write is remembered: torch's zip writer replaces the OSError
    (errno 28 on a full disk) by ``RuntimeError: [enforce fail at inline_container.cc]``."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def write(obj: dict[str, Any], fh: BinaryIO) -> None:
    """torch.save of ``obj`` sealed with its digest into ``fh``; a failed write raises its
    own OSError (which ``atomic_file`` reports as one line), any other error stays as is."""
    sink = _KeepWriteError(fh)
    try:
        torch.save(seal(obj), sink)
    except RuntimeError as exc:
        if sink.error is None:
            raise
        raise sink.error from exc


def save(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` sealed to ``path`` through a temp file + fsync + rename: a crash never
    leaves half a file, a full disk leaves the old file and raises one line."""
    target = Path(path)
    with atomic_file(target, "wb") as fh:
        write(obj, fh)
    return target


def load(path: str | os.PathLike[str], *, what: str = "torch") -> dict[str, Any]:
    """The dict saved in ``path``, loaded with ``weights_only=True`` (never runs code) and
    checked against its digest. ``what`` names the file in messages ("checkpoint", "model").

    Raises ``DamagedFile`` naming the file for anything that makes it untrustworthy, and
    a plain PipelineError when it does not exist or cannot be opened.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: a folder, not a {what} file") from None
    except PermissionError as exc:
        raise PipelineError(f"{path}: cannot read the {what} file ({exc.strerror})") from None
    except pickle.UnpicklingError as exc:  # weights_only refuses globals it does not know
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DamagedFile(
            f"{path}: the {what} file holds objects weights-only loading refuses "
            f"(code or a foreign format): {first[:200]}"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DamagedFile(
            f"{path}: the {what} file is damaged or not a torch file ({first[:200]})"
        ) from None
    verify(obj, path, what=what)
    return obj


def verify(obj: Any, path: str | os.PathLike[str], *, what: str = "torch") -> None:
    """Raise DamagedFile when ``obj`` (as loaded from ``path``) does not match its digest."""
    if not isinstance(obj, dict):
        raise DamagedFile(f"{path}: not a {what} file (holds a {type(obj).__name__}, not a dict)")
    saved = obj.get(DIGEST_KEY)
    if saved is None:
        fmt = obj.get("format")
        if isinstance(fmt, int) and fmt >= FIRST_SEALED_FORMAT:
            raise DamagedFile(f"{path}: the {what} file lost its content digest: it is damaged")
        log.warning("%s: written before %s files carried a digest; loaded unverified", path, what)
        return
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    if content_digest(body) != saved:
        raise DamagedFile(
            f"{path}: the {what} file is damaged (its content no longer matches the SHA-256 "
            "it was saved with)"
        )


def load_model_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A model.pt as saved by training (``checkpoint.save_model``), verified: the dict with
    ``state_dict``, ``classes``, ``image_shape``, ``mean``, ``std`` and what the model
    factory records. A damaged, foreign or missing file raises one line (exit 2): predict,
    serve, sync and the registry never build a model from weights that changed on disk.
    """
    obj = load(path, what="model")
    if "state_dict" not in obj:
        raise DamagedFile(f"{path}: not a model file (no state_dict; a checkpoint?)")
    return obj
