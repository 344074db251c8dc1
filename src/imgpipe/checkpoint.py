"""The training state: what a checkpoint holds, and its capture, restore, save and load.

``models/checkpoint.pt`` is the newest state, ``models/checkpoint.prev.pt`` the
one before it. A new checkpoint is written to a temp file and fsynced before
the old ones move, so a kill at any moment leaves at least one complete file.

A checkpoint describes itself (as nanoGPT's does): weights, optimizer, scheduler,
every RNG, the epoch history, the MLflow run it belongs to, the config it was
trained with, and the *fingerprint* of what shapes the model (architecture, input
shape, classes, normalisation), so it is never loaded into a model it does not fit.

Every file here is written and read through ``imgpipe.torchfile``: atomic, sealed with a
SHA-256 of its content and checked on load. A damaged newest checkpoint falls back to the
previous one with one warning; with none intact, resume stops with one line. The lock
that keeps one live writer per folder is ``imgpipe.runlock``; RNG capture and seeding
are ``imgpipe.rng``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgpipe import torchfile
from imgpipe.atomic import atomic_file
from imgpipe.errors import PipelineError
from imgpipe.models import ModelSpec, Trainable, model_file_content
from imgpipe.rng import capture_rng, restore_rng

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "checkpoint.prev.pt"
MODEL_FILE = "model.pt"
# 3: sealed with torchfile's content digest (2: the same without it, loaded unverified).
FORMAT = 3


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
    # The MLflow run's creation key (tracking.create.CREATION_KEY_TAG), chosen before the
    # run exists: a checkpoint saved before its run id was known finds the run by it.
    run_key: str | None = None
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
            "mlflow_run_key": self.run_key,
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
            run_key=state.get("mlflow_run_key"),  # older checkpoints lack it
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
            torchfile.write(self.to_dict(), fh)
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


def save_model(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    spec: ModelSpec,
) -> Path:
    """model.pt: the weights and everything needed to rebuild and feed them (``spec``:
    architecture, classes, input size and mode, normalisation, resize rule, the weights
    file's SHA-256; ``imgpipe.models.load_model_file`` reads it), nothing to resume."""
    return torchfile.save({"format": FORMAT, **model_file_content(model, spec)}, path)


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint or model.pt as a dict: ``weights_only`` (never runs code) and checked
    against its digest; ``torchfile.DamagedFile`` (one line naming the file) otherwise."""
    return torchfile.load(path, what="model" if Path(path).name == MODEL_FILE else "checkpoint")


def name_run(
    directory: str | os.PathLike[str], run_id: str, run_key: str | None, epoch: int
) -> bool:
    """Record ``run_id`` in the newest checkpoint when it is ``epoch``'s of the run with
    ``run_key``, written before the run's id was known. The file is read back rather than
    the state kept in memory, whose tensors are the live ones (an epoch stopped halfway has
    changed them since), and replaced in place: the previous file stays the fallback."""
    path = Path(directory) / CHECKPOINT_FILE
    state = load(path)
    if state.get("mlflow_run_id") or state.get("mlflow_run_key") != run_key:
        return False
    if state.get("epoch") != epoch:
        return False
    state["mlflow_run_id"] = run_id
    torchfile.save(state, path)
    return True


def remove_stale_temps(directory: str | os.PathLike[str]) -> None:
    """Delete temp files a killed process left behind (they would end up in DVC's cache)."""
    for stale in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def load_latest(directory: str | os.PathLike[str]) -> tuple[TrainingState, Path] | None:
    """The newest intact checkpoint, falling back to the previous one with one warning.

    Returns None when there is no checkpoint at all; raises one line when there are
    checkpoints but none is intact (never a silent restart from zero, never a resume
    from weights that changed on disk).
    """
    root = Path(directory)
    candidates = [p for p in (root / CHECKPOINT_FILE, root / PREVIOUS_FILE) if p.is_file()]
    problems: list[str] = []
    for path in candidates:
        try:
            state = TrainingState.from_dict(load(path))
        except (PipelineError, ValueError, KeyError, TypeError) as exc:
            # DamagedFile already names the file; from_dict's ValueError names the key.
            reason = str(exc).removeprefix(f"{path}: ")
            problems.append(f"{path.name}: {reason}")
            continue
        if problems:
            log.warning(
                "checkpoint %s is unreadable or damaged (%s); resuming from the previous "
                "checkpoint %s (epoch %d)",
                root / CHECKPOINT_FILE,
                problems[0].split(": ", 1)[1],
                path,
                state.epoch,
            )
        return state, path
    if candidates:
        raise PipelineError(
            f"no readable checkpoint in {root} ({'; '.join(problems)}); set resume=false to start fresh"
        )
    return None
