"""Randomness: seeding every RNG training touches, and capturing/restoring their states.

One room for both, so what ``seed_everything`` seeds is exactly what a checkpoint
captures and resume restores (Python's ``random``, NumPy's global RNG, torch's CPU
and CUDA RNGs, and the generator that orders the training batches).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG; return the generator that orders the training batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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
    """Put back what ``capture_rng`` took (CUDA states only where CUDA is there)."""
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
