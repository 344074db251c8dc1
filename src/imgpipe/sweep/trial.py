"""One trial: its sampler and seed, its params (public ``suggest_*``, conditional keys),
its folder and config, the training with the pruning hook, and what it records."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

from imgpipe import stop
from imgpipe.config import TrainConfig, to_schema
from imgpipe.errors import PipelineError
from imgpipe.sweep.pruning import EpochJudge, Pruned
from imgpipe.sweep.resilience import StorageUnreachable, note, retrying
from imgpipe.sweep.settings import SweepSettings, applies
from imgpipe.sweep.study import claiming, counts_towards_n_trials, fail_and_retry, trial_identity

log = logging.getLogger(__package__)  # the sweep's lines read "imgpipe.sweep: ..."


# --------------------------------------------------------------------------- sampler


def trial_seed(settings: SweepSettings, number: int) -> int | None:
    """The sampler's seed for trial ``number``: the configured seed mixed with the trial's
    number. Trial numbers are handed out once by the storage, so workers anywhere (any
    number of ``--multirun`` processes, machines) never draw from identical seeds, while
    one worker alone draws the same trials every time (reproducible)."""
    base = settings.sampler.get("seed")
    if base is None:
        return None
    key = f"{base}:trial:{number}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


def make_sampler(settings: SweepSettings, seed: int | None):
    """The configured sampler (``_target_`` must be an Optuna sampler) with ``seed``. TPE
    runs with ``constant_liar`` unless configured otherwise: trials running elsewhere
    count as bad ones, so parallel workers spread out instead of proposing alike."""
    import optuna
    from hydra.utils import get_class

    spec = dict(settings.sampler)
    target = spec.pop("_target_", "optuna.samplers.TPESampler")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)):
        raise PipelineError(f"hydra.sweeper.sampler._target_: {target} is not an Optuna sampler")
    spec["seed"] = seed
    if issubclass(cls, optuna.samplers.TPESampler):
        spec.setdefault("constant_liar", True)
    try:
        return cls(**spec)
    except TypeError as exc:
        raise PipelineError(f"hydra.sweeper.sampler: {exc}") from None


# --------------------------------------------------------------------------- one trial


def suggest(trial, name: str, dist: Any) -> Any:
    """Draw ``name`` from ``dist`` through Optuna's public ``suggest_*``."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def draw_params(trial, space: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The trial's params: every key of ``space`` (in order) that applies given those drawn
    before it and the fixed ``base`` values (``settings.CONDITIONS``)."""
    params: dict[str, Any] = {}
    for name, dist in space.items():
        if applies(name, params, base):
            params[name] = suggest(trial, name, dist)
    return params


def frozen(study, number: int):
    """The stored record of trial ``number`` (``study.get_trials``: the public view)."""
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t
    raise LookupError(f"trial {number} is not in study {study.study_name!r}")


def _trial_config(settings: SweepSettings, record, params: dict[str, Any]) -> TrainConfig:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(record)
    home = (
        Path(settings.study_dir) / "trials" / str(origin if origin is not None else record.number)
    )
    values = (
        settings.base
        | params
        | {
            "model_checkpoint_dir_path": str(home / "models"),
            "live_dir_path": str(home / "dvclive"),
            "live_images": False,  # nobody looks at a trial's; 1 s each (bench/NOTES.md)
            "mlflow_run_name": f"trial-{record.number}",
            # Only the sweep registers, and only its best trial (imgpipe.tracking.registry).
            "mlflow_registered_model_name": None,
            # A retry continues its own trial's checkpoint; a new trial never reads another's.
            "resume": origin is not None,
        }
    )
    return to_schema(TrainConfig, values, f"trial {record.number}")


def _is_surplus(study, trial, n_trials: int) -> bool:
    """Only the first n_trials live trials may run: trial numbers are handed out
    atomically by the storage, so racing workers agree on which one is surplus."""
    from optuna.trial import TrialState

    earlier = sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and (counts_towards_n_trials(t) or t.state == TrialState.RUNNING)
    )
    return earlier >= n_trials


def _train_trial(trial, settings: SweepSettings, study, space: dict[str, Any], index: int):
    """Draw the trial's params (conditional ones only where they apply) and train it."""
    from imgpipe.train import train

    study.sampler = make_sampler(settings, trial_seed(settings, trial.number))
    params = draw_params(trial, space, settings.base)
    cfg = _trial_config(settings, retrying(lambda: frozen(study, trial.number)), params)
    log.info("trial %d (worker %d): %s", trial.number, index, params)
    judge = EpochJudge(trial, study, settings.pruner, settings.directions, cfg.epochs)
    return train(
        cfg,
        parent_run_id=settings.parent_run_id,
        tags={"trial_number": str(trial.number), "optuna_study": settings.study_name},
        on_epoch=judge,
    )


def run_trial(
    trial, *, settings: SweepSettings, study, storage, space: dict[str, Any], index: int
) -> tuple[float, ...]:
    """The objective: train one trial; its objectives, as many as the study has directions."""
    import optuna

    for key, value in trial_identity(trial.number).items():
        note(trial, key, value)
    if retrying(lambda: _is_surplus(study, trial, settings.n_trials)):
        note(trial, "surplus", True)
        raise optuna.TrialPruned("study already has n_trials trials")
    started = time.perf_counter()
    try:
        result = _train_trial(trial, settings, study, space, index)
    except stop.Stopped:
        _retry_later(study, storage, settings.storage, trial.number)
        raise
    except Pruned as exc:
        note(trial, "duration_s", round(time.perf_counter() - started, 3))
        if exc.run_id:
            note(trial, "mlflow_run_id", exc.run_id)
            mark_pruned_run(settings.base["mlflow_tracking_uri"], exc.run_id, exc.epoch)
        log.info("trial %d pruned after epoch %d", trial.number, exc.epoch)
        raise optuna.TrialPruned(str(exc)) from None
    except StorageUnreachable:
        raise
    except Exception as exc:  # Ctrl-C is not a failure: that trial is retried next time
        if run_id := getattr(exc, "run_id", None):
            note(trial, "mlflow_run_id", run_id)
        # Recorded before Optuna marks the trial FAIL: a genuine failure counts
        # towards n_trials, unlike a trial whose worker died (that one is retried).
        note(trial, "failure", f"{type(exc).__name__}: {exc}"[:500])
        note(trial, "duration_s", round(time.perf_counter() - started, 3))
        log.warning("trial %d failed: %s", trial.number, exc)
        raise
    if result.run_id:
        note(trial, "mlflow_run_id", result.run_id)
    note(trial, "duration_s", round(time.perf_counter() - started, 3))
    note(trial, "train_s", round(result.timings.epochs_s, 3))
    # Reported, never optimised: the parent run shows the chosen trial's test metrics.
    note(trial, "test/loss", result.test_loss)
    note(trial, "test/accuracy", result.test_accuracy)
    values = result.objectives
    if not all(math.isfinite(v) for v in values):
        note(trial, "failure", f"non-finite objective {values}")  # Optuna fails it
    return values[: len(settings.directions)]


def mark_pruned_run(tracking_uri: str | None, run_id: str, epoch: int) -> None:
    """A pruned trial's MLflow run: status KILLED, tags ``pruned=true`` and the epoch. A
    tracking server that is gone costs the marks, never the sweep (training runs keep going
    through outages the same way)."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    from imgpipe.tracking.outbox import send_failures
    from imgpipe.tracking.store import resolve_tracking_uri

    try:
        client = MlflowClient(resolve_tracking_uri(tracking_uri))
        client.log_batch(
            run_id, tags=[RunTag("pruned", "true"), RunTag("pruned_at_epoch", str(epoch))]
        )
        client.set_terminated(run_id, status="KILLED")
    except send_failures() as exc:
        log.warning("MLflow run %s: could not mark it pruned (%s)", run_id, type(exc).__name__)


def _retry_later(study, storage, url: str, number: int) -> None:
    """A stopped trial is no failure: FAIL it without a ``failure`` (so it does not count
    towards n_trials) and queue its retry, which resumes the trial's own checkpoint. Done
    here, not left to the dead-pid check, so a worker on any machine is retried at once."""
    with claiming(url):  # a neighbour failing it as stale at the same moment: one retry
        queued = retrying(lambda: fail_and_retry(study, storage, number), what="queueing a retry")
    if queued:
        log.warning("trial %d stopped: the next run of the sweep continues it", number)
