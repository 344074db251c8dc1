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
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from imgpipe import checkpoint, distributed
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


def capture_state(
    parts: Trainable,
    generator: torch.Generator,
    augmenter: Augmenter | None,
    state: TrainingState,
    epoch: int,
    train_count: int,
    cfg: TrainConfig,
    group: Group,
) -> TrainingState:
    """The state after ``epoch`` (every rank's RNG, the augmenter's included), with the
    run's key and, on resume, its id. Every rank of a group calls this together (the RNGs
    are gathered); ``Checkpoints`` writes rank 0's."""
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
    now.run_id = state.run_id
    now.run_key = state.run_key
    keep_augmenter(now, augmenter)
    distributed.gather_rngs(now, group)
    return now


class Checkpoints:
    """The checkpoints a training writes (rank 0 alone), filed under its MLflow run.

    A fresh training's first checkpoint drops the files of the run before it. Where its
    MLflow run is still being made then (a new store's migrations, a busy server), training
    does not wait for it: the older files are set aside (``.<name>.before.tmp``) and the new
    checkpoints carry the run's key alone (a resume finds the run by it). Once the run
    exists the older files go; when it never comes to exist (HTTP 403, an unusable
    experiment) the new checkpoints go and the older files are put back, so a refused run
    leaves the folder as it found it.

    On the way out, the newest checkpoint written before its run's id was known is filed
    under the id."""

    def __init__(self, tracker: Any, directory: str | Path, main: bool) -> None:
        self.tracker = tracker
        self.directory = Path(directory)
        self.main = main
        self.last: TrainingState | None = None  # the newest written
        self._fresh = False  # the next write is a fresh training's first
        self._unsettled = False  # written before the fresh training's run was made
        self._set_aside: list[tuple[Path, Path]] = []  # (aside, where it was)

    def begin(self, initial: TrainingState) -> None:
        """A fresh training's epoch 0, after its first epoch."""
        self._fresh = True
        if self.main:  # a killed training's temps, its set-aside files among them
            checkpoint.remove_stale_temps(self.directory)
        if self.main and self.tracker.starting():
            self._set_aside_older()
            self._unsettled = True
        self.add(initial)

    def add(self, state: TrainingState) -> None:
        """Write ``state`` as the newest checkpoint (under the run's id once it is known);
        a refusal of the fresh training's run is raised instead."""
        if not self.main:
            return
        if (self._fresh or self._unsettled) and not self.tracker.starting():
            self.tracker.wait()  # made, or what refused it is raised here: nothing written
            self._settle()
        state.run_id = state.run_id or self.tracker.run_id
        state.save(self.directory, keep_previous=not self._fresh)
        self._fresh = False
        self.last = state

    @contextlib.contextmanager
    def filed(self) -> Iterator[None]:
        """Around the training, outside its tracker: the run has ended (or never began)."""
        try:
            yield
        except BaseException:
            self._settle()
            self._file_last()
            raise
        self._settle()
        self._file_last()

    def _set_aside_older(self) -> None:
        for name in (checkpoint.CHECKPOINT_FILE, checkpoint.PREVIOUS_FILE):
            where = self.directory / name
            if where.exists():
                aside = self.directory / f".{name}.before.tmp"
                os.replace(where, aside)
                self._set_aside.append((aside, where))

    def _settle(self) -> None:
        """The run exists and this training checkpointed: the older files go. The run never
        came to be, or no checkpoint of this training could be written (a full disk): they
        come back, as a fresh training's first write that fails leaves them."""
        if not self._unsettled:
            return
        self._unsettled = False
        made = self.tracker.run_id is not None
        if not made:
            for name in (checkpoint.CHECKPOINT_FILE, checkpoint.PREVIOUS_FILE):
                (self.directory / name).unlink(missing_ok=True)
            self.last = None
        keep_new = made and self.last is not None
        for aside, where in self._set_aside:
            if keep_new:
                aside.unlink(missing_ok=True)
            else:
                os.replace(aside, where)
        if self._set_aside and not keep_new:
            log.warning(
                "%s: the checkpoints in %s are back as they were before this training",
                "no checkpoint was written" if made else "the MLflow run was not made",
                self.directory,
            )
        self._set_aside = []

    def _file_last(self) -> None:
        last, run_id = self.last, self.tracker.run_id
        if not (self.main and last is not None and last.run_id is None and run_id):
            return
        try:
            checkpoint.name_run(self.directory, run_id, last.run_key, last.epoch)
        except PipelineError as exc:  # a full disk: the checkpoint stays as it was
            log.warning("%s; it keeps the run's key, by which a resume finds run %s", exc, run_id)
