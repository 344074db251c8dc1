"""The training state: what a checkpoint holds, and its capture, restore, save and load.

``models/checkpoint.pt`` is the newest state, ``models/checkpoint.prev.pt`` the
one before it. A new checkpoint is written to a temp file and fsynced before
the old ones move, so a kill at any moment leaves at least one complete file.

A checkpoint describes itself (as nanoGPT's does): weights, optimizer, scheduler,
every RNG, the epoch history, the MLflow run it belongs to, the config it was
trained with, and the *fingerprint* of what shapes the model (architecture, input
shape, classes, normalisation), so it is never loaded into a model it does not fit.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from imgpipe.atomic import atomic_file, write_error
from imgpipe.errors import PipelineError
from imgpipe.model import Trainable

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "checkpoint.prev.pt"
MODEL_FILE = "model.pt"
# Held while a training lives; .dvcignore keeps it out of the folder's DVC output.
LOCK_FILE = ".imgpipe.lock"
FORMAT = 2


def fingerprint(
    model_name: str,
    image_shape: tuple[int, ...],
    classes: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> str:
    """What a checkpoint's weights depend on: architecture, input shape, classes, normalisation."""
    key = {
        "model": model_name,
        "image_shape": list(image_shape),
        "classes": classes,
        "mean": list(mean),
        "std": list(std),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainingState:
    """Where a run stands after ``epoch`` (0: before the first): everything resume needs."""

    epoch: int
    global_step: int
    fingerprint: str
    config: dict[str, Any]
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None
    # With several processes: each rank's ``rng``, in rank order (``rng`` is rank 0's,
    # so a checkpoint of 1 process and older ones, which lack these, load the same way).
    rank_rngs: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1

    @classmethod
    def capture(
        cls,
        parts: Trainable,
        generator: torch.Generator,
        *,
        epoch: int,
        global_step: int,
        history: list[dict[str, Any]],
        fingerprint: str,
        config: dict[str, Any],
        keep: bool = False,
    ) -> TrainingState:
        """The state as it is now; ``keep`` copies the tensors, to save them later."""
        own = copy.deepcopy if keep else (lambda state: state)
        return cls(
            epoch=epoch,
            global_step=global_step,
            fingerprint=fingerprint,
            config=config,
            model=own(parts.model.state_dict()),
            optimizer=own(parts.optimizer.state_dict()),
            scheduler=own(parts.scheduler.state_dict()),
            rng=capture_rng(generator),
            history=list(history),
        )

    def restore(self, parts: Trainable, generator: torch.Generator, rank: int = 0) -> None:
        """Put the weights, optimizer, scheduler and every RNG back where they were
        (``rank``'s own RNG states; a rank the checkpoint lacks takes rank 0's)."""
        parts.model.load_state_dict(self.model)
        parts.optimizer.load_state_dict(self.optimizer)
        parts.scheduler.load_state_dict(self.scheduler)
        rngs = self.rank_rngs or [self.rng]
        restore_rng(rngs[rank] if rank < len(rngs) else rngs[0], generator)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "rng": self.rng,
            "history": self.history,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "mlflow_run_id": self.run_id,
            "rank_rngs": self.rank_rngs,
            "world_size": self.world_size,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainingState:
        """Raises ValueError naming what is missing from a damaged or foreign file."""
        if not isinstance(state, dict):
            raise ValueError("not a checkpoint")
        # Checkpoints written before the fingerprint had its name call it "config_hash".
        if "fingerprint" not in state and "config_hash" in state:
            state = {**state, "fingerprint": state["config_hash"]}
        missing = REQUIRED_KEYS - set(state)
        if missing:
            raise ValueError(f"missing {', '.join(sorted(missing))}")
        return cls(
            epoch=state["epoch"],
            global_step=state["global_step"],
            fingerprint=state["fingerprint"],
            config=state.get("config", {}),
            model=state["model"],
            optimizer=state["optimizer"],
            scheduler=state["scheduler"],
            rng=state["rng"],
            history=list(state["history"]),
            run_id=state["mlflow_run_id"],
            rank_rngs=list(state.get("rank_rngs") or []),
            world_size=int(state.get("world_size", 1)),
        )

    def save(self, directory: str | os.PathLike[str], *, keep_previous: bool) -> Path:
        """Write this state as the newest checkpoint.

        ``keep_previous=False`` (the first save of a fresh run) drops the older
        files instead of keeping one as fallback, so a resume can never fall back
        into a different run. A failed write (a full disk) leaves both files as
        they were and raises the one-line PipelineError.
        """
        root = Path(directory)
        current, previous = root / CHECKPOINT_FILE, root / PREVIOUS_FILE

        def rotate() -> None:  # the new file is complete and on disk by now
            if keep_previous and current.exists():
                os.replace(current, previous)
            elif not keep_previous:
                previous.unlink(missing_ok=True)

        with atomic_file(current, "wb", before_replace=rotate) as fh:
            torch_save(self.to_dict(), fh)
        return current


REQUIRED_KEYS = frozenset(
    {
        "format",
        "epoch",
        "global_step",
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "history",
        "fingerprint",
        "mlflow_run_id",
    }
)


def save_atomic(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """torch.save through a temp file + fsync + rename: a crash never leaves half a file."""
    target = Path(path)
    with atomic_file(target, "wb") as fh:
        torch_save(obj, fh)
    return target


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


def torch_save(obj: Any, fh: BinaryIO) -> None:
    """torch.save into ``fh``; a failed write raises its own OSError, which ``atomic_file``
    reports as one line, while any other RuntimeError of torch's stays what it is."""
    sink = _KeepWriteError(fh)
    try:
        torch.save(obj, sink)
    except RuntimeError as exc:
        if sink.error is None:
            raise
        raise sink.error from exc


def save_model(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    model_name: str,
    classes: list[str],
    image_shape: tuple[int, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Path:
    """model.pt: the weights and everything needed to use them, nothing to resume."""
    return save_atomic(
        {
            "model_name": model_name,
            "state_dict": model.state_dict(),
            "classes": classes,
            "image_shape": list(image_shape),
            "mean": list(mean),
            "std": list(std),
        },
        path,
    )


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint can never run code on load."""
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_stale_temps(directory: str | os.PathLike[str]) -> None:
    """Delete temp files a killed process left behind (they would end up in DVC's cache)."""
    for stale in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


@contextlib.contextmanager
def lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """One live training per checkpoint folder, for as long as the block runs.

    An exclusive ``flock`` on ``LOCK_FILE``: the kernel drops it when its holder ends
    in any way (SIGKILL included), so a dead run never blocks the next one, and a
    second run while the holder lives stops with one line naming its host and pid
    (written into the file for that message). The holder removes the file, and the
    folders it made for it, when the block ends; a killed holder's file stays, is
    ignored by DVC (.dvcignore) and taken over. On NFS the server's lock manager
    decides, and a lock of a client that vanished is freed when its lease ends.
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


def load_latest(directory: str | os.PathLike[str]) -> tuple[TrainingState, Path] | None:
    """The newest checkpoint that loads, falling back to the previous one with a warning.

    Returns None when there is no checkpoint at all; raises when there are
    checkpoints but none is readable (never a silent restart from zero).
    """
    root = Path(directory)
    candidates = [p for p in (root / CHECKPOINT_FILE, root / PREVIOUS_FILE) if p.is_file()]
    problems = []
    for path in candidates:
        try:
            state = TrainingState.from_dict(load(path))
        except Exception as exc:  # a damaged file raises anything from EOFError to RuntimeError
            problems.append(f"{path.name}: {type(exc).__name__}")
            log.warning(
                "checkpoint %s is unreadable (%s: %s); trying the previous one",
                path,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            continue
        if problems:
            log.warning("resuming from the previous checkpoint %s (epoch %d)", path, state.epoch)
        return state, path
    if candidates:
        raise PipelineError(
            f"no readable checkpoint in {root} ({'; '.join(problems)}); set resume=false to start fresh"
        )
    return None


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG that training touches, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "loader": generator.get_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
