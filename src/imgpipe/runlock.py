"""One live training per checkpoint folder: the lock, and who holds it.

An exclusive ``flock`` on ``.imgpipe.lock`` inside the folder. The kernel drops it when
its holder ends in any way (SIGKILL included), so a dead run never blocks the next one;
a second run while the holder lives stops with one line naming its host and pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from imgpipe.atomic import write_error
from imgpipe.errors import PipelineError

# Held while a training lives; .dvcignore keeps it out of the folder's DVC output.
LOCK_FILE = ".imgpipe.lock"


@contextlib.contextmanager
def lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """One live training per checkpoint folder, for as long as the block runs.

    The holder writes its host and pid into the file (for the refusal's message),
    removes the file, and the folders it made for it, when the block ends; a killed
    holder's file stays, is ignored by DVC (.dvcignore) and taken over. On NFS the
    server's lock manager decides, and a lock of a client that vanished is freed when
    its lease ends.
    """
    root = Path(directory)
    path = root / LOCK_FILE
    made = [d for d in (root, *root.parents) if not d.exists()]
    fd = _take(path)
    try:
        # Only the message needs this: the lock holds even if a full disk refuses it.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):  # removed while held: see _take
            path.unlink()
            for folder in made:  # a run that stopped before any work leaves no folder
                folder.rmdir()
        os.close(fd)  # releases the lock


def _take(path: Path) -> int:
    """The locked, open lock file; PipelineError naming the holder when it is held."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise write_error(path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise PipelineError(
                f"{path.parent} is in use by another training ({holder}); "
                "wait for it to end or stop it"
            ) from None
        except OSError as exc:  # e.g. ENOLCK: an NFS mount without a lock manager
            os.close(fd)
            raise PipelineError(f"cannot lock {path}: {exc.strerror}") from exc
        # The holder before may have removed the file between our open and our lock:
        # then this lock is on a file nobody else can see, and the name is taken anew.
        with contextlib.suppress(FileNotFoundError):
            named, opened = os.stat(path), os.fstat(fd)
            if (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino):
                return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the lock, as it wrote itself into the file (give it a moment to)."""
    for _ in range(20):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "host and pid not recorded"
