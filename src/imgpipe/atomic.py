"""Atomic file and directory writes, so a failed run never leaves half an output.

A write that fails (a full disk, a read-only or missing folder) leaves the previous
output in place, removes its temp file or folder, and raises a PipelineError naming
the output and the reason: ``cannot write data/processed: No space left on device``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from imgpipe.errors import PipelineError


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    with contextlib.suppress(OSError):  # not every filesystem allows opening a dir
        fsync_path(path)


def write_error(target: str | os.PathLike[str], exc: OSError) -> PipelineError:
    """The one line a failed write of ``target`` gives: the output and the reason."""
    return PipelineError(f"cannot write {os.fspath(target)}: {exc.strerror or exc}")


def _is_ours(exc: OSError, tmp: Path, target: Path) -> bool:
    """Whether an OSError raised while writing ``target`` is about that output.

    A full disk surfaces in write, pwrite, flush or fsync without a file name; opening,
    moving or syncing names the temp output, the target or its moved-aside old copy.
    An error naming any other file (an input that cannot be read) is the caller's.
    """
    names = [os.path.abspath(os.fsdecode(n)) for n in (exc.filename, exc.filename2) if n]
    if not names:
        return True
    tmp_abs, target_abs = os.path.abspath(tmp), os.path.abspath(target)
    for name in names:
        if name == target_abs or os.path.commonpath([name, tmp_abs]) == tmp_abs:
            return True
        sibling = os.path.dirname(name) == os.path.dirname(target_abs)
        if sibling and os.path.basename(name).startswith(f".{target.name}."):
            return True
    return False


@contextlib.contextmanager
def _writing(target: Path, tmp: Path, discard: Callable[[], None]) -> Iterator[None]:
    """Discard the temp output on any failure; an OSError of the output's own becomes
    the one-line PipelineError, anything else (Ctrl-C included) passes unchanged."""
    try:
        yield
    except OSError as exc:
        discard()
        if _is_ours(exc, tmp, target):
            raise write_error(target, exc) from exc
        raise
    except BaseException:
        discard()
        raise


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    before_replace: Callable[[], None] | None = None,
) -> Iterator:
    """Write ``path`` through a temp file in the same directory, then rename it into place.

    ``before_replace`` runs once the new file is complete and on disk, just before it
    takes the name (the checkpoint moves its predecessor aside there).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise write_error(target, exc) from exc
    tmp = Path(name)
    with _writing(target, tmp, lambda: tmp.unlink(missing_ok=True)):
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; outputs get normal permissions
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, target)
        fsync_dir(target.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temp directory that replaces ``path`` only if the block succeeds.

    POSIX cannot rename a directory over a non-empty one, so the old output is
    moved aside first and deleted only after the new one is in place.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise write_error(target, exc) from exc
    with _writing(target, tmp, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        yield tmp
        # What was written inside reaches the disk before the rename makes it visible:
        # otherwise a crash could leave the new name pointing at empty files.
        for folder, _, names in os.walk(tmp):
            for name in names:
                fsync_path(os.path.join(folder, name))
            fsync_dir(folder)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:  # the previous output takes its name back
                os.replace(old, target)
            raise
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
