"""Atomic save and safe load of the full training state.

``models/checkpoint.pt`` is the newest state, ``models/checkpoint.prev.pt`` the
one before it. A new checkpoint is written to a temp file and fsynced before
the old ones move, so a kill at any moment leaves at least one complete file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgpipe.atomic import atomic_file, fsync_dir, umask
from imgpipe.errors import PipelineError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "checkpoint.prev.pt"
MODEL_FILE = "model.pt"
FORMAT = 2
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
        "config_hash",
        "mlflow_run_id",
    }
)


def save_atomic(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """torch.save through a temp file + fsync + rename: a crash never leaves half a file."""
    target = Path(path)
    with atomic_file(target, "wb") as fh:
        torch.save(obj, fh)
    return target


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint can never run code on load."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(
    state: dict[str, Any], directory: str | os.PathLike[str], *, keep_previous: bool
) -> Path:
    """Write ``state`` as the newest checkpoint.

    ``keep_previous=False`` (the first save of a fresh run) drops the older
    files instead of keeping one as fallback, so a resume can never fall back
    into a different run.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    current, previous = root / CHECKPOINT_FILE, root / PREVIOUS_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp", dir=root)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and current.exists():
            os.replace(current, previous)
        elif not keep_previous:
            previous.unlink(missing_ok=True)
        os.replace(tmp, current)
        fsync_dir(root)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return current


def remove_stale_temps(directory: str | os.PathLike[str]) -> None:
    """Delete temp files a killed process left behind (they would end up in DVC's cache)."""
    for stale in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def load_latest(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads, falling back to the previous one with a warning.

    Returns None when there is no checkpoint at all; raises when there are
    checkpoints but none is readable (never a silent restart from zero).
    """
    root = Path(directory)
    candidates = [p for p in (root / CHECKPOINT_FILE, root / PREVIOUS_FILE) if p.is_file()]
    problems = []
    for path in candidates:
        try:
            state = load(path)
            missing = REQUIRED_KEYS - set(state) if isinstance(state, dict) else REQUIRED_KEYS
            if missing:
                raise ValueError(f"missing {', '.join(sorted(missing))}")
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
            log.warning("resuming from the previous checkpoint %s (epoch %d)", path, state["epoch"])
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
