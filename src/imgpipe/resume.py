"""Resume policy: which checkpoint a run continues, what must match, what may change; and
the states a run saves to be resumed from (epoch 0, then after each checkpointed epoch).

The checkpoint must fit the model (its fingerprint: architecture and weights file, input
shape, classes, normalisation) or the run stops with one line. Keys that change the path
training takes (``config.result_keys(TRAJECTORY)``) may differ, with one warning naming
them; so may the world size. An extended run (more ``epochs``) measures test again at its
new end, so the history keeps only that look, as a straight run has.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from imgpipe import checkpoint, distributed, stop
from imgpipe.augment import Augmenter
from imgpipe.checkpoint import TrainingState
from imgpipe.config import TRAJECTORY, TrainConfig, result_keys
from imgpipe.distributed import Group
from imgpipe.errors import PipelineError
from imgpipe.metrics import TEST_METRIC_NAMES
from imgpipe.models import ModelSpec, Trainable
from imgpipe.parts import loggable_params
from imgpipe.tracking.create import new_run_key

log = logging.getLogger(__name__)

AUGMENT_RNG = "augment"  # the augmenter's generator, in each rank's RNG states


def restore(
    ckpt_dir: Path,
    fingerprint: str,
    cfg: TrainConfig,
    config: dict[str, Any],
    parts: Trainable,
    generator: torch.Generator,
    group: Group,
    augmenter: Augmenter | None = None,
) -> TrainingState | None:
    """Load the newest valid checkpoint into the training objects (resume=true). Rank 0
    reads it and hands it to the other ranks, so all continue from the same file.
    ``config``: the run's params as the checkpoint records them."""
    if group.main:
        checkpoint.remove_stale_temps(ckpt_dir)
    found = distributed.from_main(group, checkpoint.load_latest(ckpt_dir) if group.main else None)
    if found is None:
        log.warning("resume=true but no checkpoint in %s: starting fresh", ckpt_dir)
        return None
    state, path = found
    if state.fingerprint != fingerprint:
        raise PipelineError(
            f"{path}: checkpoint was trained for a different model or data (architecture or "
            "weights file, image shape, classes or normalisation); set resume=false to start fresh"
        )
    changed = [k for k in result_keys(TRAJECTORY) if state.config.get(k) != getattr(cfg, k)]
    if changed:
        log.warning(
            "resuming with %s changed since the checkpoint; optimizer and scheduler state "
            "continue from the checkpoint",
            ", ".join(f"{k}={getattr(cfg, k)} (was {state.config.get(k)})" for k in changed),
        )
    if state.world_size != group.world:
        log.warning(
            "resuming with %d processes, the checkpoint ran on %d: batches are shared out "
            "differently from here, so the trajectory changes (the model continues)",
            group.world,
            state.world_size,
        )
    state.restore(parts, generator, group.rank)
    if augmenter is not None and (saved := own_rng(state, group.rank).get(AUGMENT_RNG)) is not None:
        augmenter.set_state(saved)
    log.info("resuming after epoch %d from %s (MLflow run %s)", state.epoch, path, state.run_id)
    # Older checkpoints lack the key; a run continued by its id tags the new one nowhere.
    state.run_key = state.run_key or new_run_key()
    state.config = config
    if state.epoch < cfg.epochs:
        # Extended: test is measured again after the new last epoch. The history (and so
        # dvclive) keeps only that look, as a straight run has; MLflow keeps the earlier one.
        for entry in state.history:
            for name in TEST_METRIC_NAMES:
                entry["metrics"].pop(name, None)
    return state


def own_rng(state: TrainingState, rank: int) -> dict[str, Any]:
    """``rank``'s RNG states in the checkpoint (rank 0's for a rank it lacks)."""
    rngs = state.rank_rngs or [state.rng]
    return rngs[rank] if rank < len(rngs) else rngs[0]


def keep_augmenter(state: TrainingState, augmenter: Augmenter | None) -> None:
    """Put the augmenter's generator among the RNG states ``state`` is about to save."""
    if augmenter is not None:
        state.rng[AUGMENT_RNG] = augmenter.state()


def model_fingerprint(spec: ModelSpec) -> str:
    return checkpoint.fingerprint(
        spec.identity, spec.image_shape, list(spec.classes), spec.mean, spec.std
    )


def fresh_state(
    parts: Trainable,
    generator: torch.Generator,
    spec: ModelSpec,
    cfg: TrainConfig,
    augmenter: Augmenter | None,
) -> TrainingState:
    """Epoch 0: the initial weights, kept aside (copied) to be saved after the first
    epoch, with the key of the MLflow run this training makes (its id may come later)."""
    state = TrainingState.capture(
        parts,
        generator,
        epoch=0,
        global_step=0,
        history=[],
        fingerprint=model_fingerprint(spec),
        config=loggable_params(cfg, spec),
        keep=True,
    )
    keep_augmenter(state, augmenter)
    state.run_key = new_run_key()
    return state


def save_state(
    parts: Trainable,
    generator: torch.Generator,
    augmenter: Augmenter | None,
    state: TrainingState,
    epoch: int,
    train_count: int,
    cfg: TrainConfig,
    run_id: str | None,
    group: Group,
) -> TrainingState:
    """Checkpoint after ``epoch``: the state as it is now (every rank's RNG, the
    augmenter's included), filed under the run by rank 0: its id when known (``run_id``,
    else the one resumed), always its key. Returns that state."""
    steps_per_epoch = -(-train_count // cfg.train_bs)
    now = TrainingState.capture(
        parts,
        generator,
        epoch=epoch,
        global_step=state.global_step + (epoch - state.epoch) * steps_per_epoch,
        history=state.history,
        fingerprint=state.fingerprint,
        config=state.config,
    )
    now.run_id = run_id or state.run_id
    now.run_key = state.run_key
    keep_augmenter(now, augmenter)
    distributed.gather_rngs(now, group)
    if group.main:
        now.save(cfg.model_checkpoint_dir_path, keep_previous=True)
    return now


class LastCheckpoint:
    """The newest checkpoint this process wrote. A checkpoint written while the MLflow run
    was still being made carries only the run's key; on the way out (the training's end or
    a stop) it is filed under the run's id once that is known, so the checkpoint a training
    leaves names its run."""

    def __init__(self) -> None:
        self.state: TrainingState | None = None

    @contextlib.contextmanager
    def filed_under(self, tracker: Any, directory: str | Path, main: bool) -> Iterator[None]:
        try:
            yield
        except stop.Stopped:
            self._file(tracker.run_id, directory, main)
            raise
        self._file(tracker.run_id, directory, main)

    def _file(self, run_id: str | None, directory: str | Path, main: bool) -> None:
        if main and self.state is not None and self.state.run_id is None and run_id:
            self.state.run_id = run_id
            self.state.save(directory, keep_previous=True)
