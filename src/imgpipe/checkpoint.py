"""Atomic save and safe load of the full training state."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgpipe.atomic import atomic_file

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"


def save_atomic(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """torch.save through a temp file + fsync + rename: a crash never leaves half a file."""
    target = Path(path)
    with atomic_file(target, "wb") as fh:
        torch.save(obj, fh)
    return target


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint can never run code on load."""
    return torch.load(path, map_location="cpu", weights_only=True)


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
