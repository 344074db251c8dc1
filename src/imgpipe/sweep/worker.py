"""Workers: each takes trials from the study and trains them until the study is done."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from imgpipe import progress, stop
from imgpipe.config import TrainConfig, to_schema
from imgpipe.errors import PipelineError
from imgpipe.sweep.pruning import EpochJudge, Pruned, optuna_pruner
from imgpipe.sweep.resilience import (
    Heartbeat,
    StorageUnreachable,
    note,
    recently_cut_off,
    retrying,
)
from imgpipe.sweep.settings import OBJECTIVE_NAMES, SweepSettings, applies, search_distributions
from imgpipe.sweep.study import (
    census,
    counts_towards_n_trials,
    fail_and_retry,
    fail_dead_local_trials,
    grace_seconds,
    open_storage,
    worker_identity,
)
from imgpipe.tracking.store import HPTUNING_TAG_ENV

log = logging.getLogger(__package__)  # the sweep's lines read "imgpipe.sweep: ..."

POLL_S = 1.0
# `docker stop` kills after 10 s, Kubernetes after 30 s: workers stop at a batch boundary
# long before this, and the main process still has time to end the parent run.
STOP_GRACE_S = 7.0


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
    judge = EpochJudge(
        trial, study, settings.pruner, settings.directions, OBJECTIVE_NAMES[0], cfg.epochs
    )
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

    for key, value in worker_identity().items():
        note(trial, key, value)
    if retrying(lambda: _is_surplus(study, trial, settings.n_trials)):
        note(trial, "surplus", True)
        raise optuna.TrialPruned("study already has n_trials trials")
    started = time.perf_counter()
    try:
        result = _train_trial(trial, settings, study, space, index)
    except stop.Stopped:
        _retry_later(study, storage, trial.number)
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


def _retry_later(study, storage, number: int) -> None:
    """A stopped trial is no failure: FAIL it without a ``failure`` (so it does not count
    towards n_trials) and queue its retry, which resumes the trial's own checkpoint. Done
    here, not left to the dead-pid check, so a worker on any machine is retried at once."""
    if retrying(lambda: fail_and_retry(study, storage, number), what="queueing a retry"):
        log.warning("trial %d stopped: the next run of the sweep continues it", number)


# --------------------------------------------------------------------------- workers


def run_worker(
    settings: SweepSettings, index: int, on_progress: Callable[[], None] | None = None
) -> int:
    """Take trials from the study until it holds ``n_trials`` finished ones; return how many
    ran. ``on_progress`` is called whenever the study may have moved on (the sweep's bar)."""
    import optuna
    import torch

    import imgpipe.train  # noqa: F401  (loaded here, not on the first trial's clock)

    torch.set_num_threads(settings.threads_per_worker)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(settings.storage)
    study = retrying(
        lambda: optuna.load_study(
            study_name=settings.study_name,
            storage=storage,
            sampler=make_sampler(settings, trial_seed(settings, -1 - index)),
            pruner=optuna_pruner(settings.pruner, int(settings.base["epochs"])),
        ),
        what="loading the study",
    )
    space = search_distributions(settings.search_space)
    if settings.hptuning_tag:
        os.environ[HPTUNING_TAG_ENV] = settings.hptuning_tag
    ran = 0
    while True:
        if ran > 3 * settings.n_trials + 10:  # a bug, not a sweep: never spin forever
            raise PipelineError(
                f"sweep worker {index} ran {ran} trials without the study finishing"
            )
        stop.check()  # between trials: no new one once a stop was asked for
        look_after_dead_trials(study, storage)
        now = retrying(lambda: census(study), what="counting trials")
        if on_progress is not None:
            on_progress()
        if now.finished >= settings.n_trials:
            break
        if now.finished + now.running >= settings.n_trials and not now.waiting:
            time.sleep(POLL_S)  # the last trials are running elsewhere; one may still fail stale
            continue
        run_one(study, storage, settings, space, index)
        ran += 1
    return ran


def look_after_dead_trials(study, storage) -> None:
    """Fail (and retry) trials whose worker died: on this machine at once, elsewhere once
    their heartbeat is older than the grace period. Not right after this worker itself lost
    the database: the others' heartbeats could not arrive either."""
    import optuna
    from optuna.storages import RDBStorage

    if isinstance(storage, RDBStorage) and not recently_cut_off(grace_seconds()):
        retrying(lambda: optuna.storages.fail_stale_trials(study), what="failing stale trials")
    retrying(lambda: fail_dead_local_trials(study, storage), what="failing dead trials")


def run_one(study, storage, settings: SweepSettings, space: dict[str, Any], index: int) -> None:
    """Ask the study for a trial, train it with its heartbeat kept up, tell the outcome. Every
    storage call is retried through an outage; telling the end is safe to repeat."""
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    trial = retrying(study.ask, what="asking for a trial")
    beat: Any = contextlib.nullcontext()
    if isinstance(storage, RDBStorage) and storage.get_heartbeat_interval():
        trial_id = retrying(
            lambda: storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(study.study_name), trial.number
            )
        )
        beat = Heartbeat(storage, trial_id, float(storage.get_heartbeat_interval()))

    def tell(values: Any = None, state: Any = None) -> None:
        retrying(
            lambda: study.tell(trial, values, state=state),
            what=f"telling trial {trial.number}",
            after_retry=lambda: study.tell(trial, values, state=state, skip_if_finished=True),
        )

    with beat:
        try:
            values = run_trial(
                trial, settings=settings, study=study, storage=storage, space=space, index=index
            )
        except optuna.TrialPruned:
            tell(state=TrialState.PRUNED)
            return
        except stop.Stopped:
            raise  # the trial was queued for its retry
        except StorageUnreachable:
            raise  # no tell possible; the trial is retried once its worker is seen dead
        except Exception:  # run_trial logged and recorded the failure
            tell(state=TrialState.FAIL)
            return
    if all(math.isfinite(v) for v in values):
        tell(values=list(values))
    else:
        tell(state=TrialState.FAIL)


def _worker_entry(settings: SweepSettings, index: int, log_dir: str, parent: int) -> None:
    from imgpipe.logs import setup_logging

    # Its own process group: a terminal's Ctrl-C or a signal to the main process's group
    # reaches the main process only, which passes it on once (a second would be "now").
    os.setpgid(0, 0)
    stop.die_with_parent(parent)  # a main process killed by SIGKILL leaves no worker behind
    stop.install(watch_launchers=False)
    setup_logging(log_dir)
    progress.hide_in_this_process()  # the main process draws the sweep's one bar
    try:
        run_worker(settings, index)
    except PipelineError as exc:
        log.error("worker %d: %s", index, exc)
        raise SystemExit(2) from None
    except stop.Stopped as exc:
        log.info("worker %d stopped by %s", index, exc.signame)
        raise SystemExit(exc.exit_code) from None


def _stop_workers(procs: list, signum: int) -> None:
    """Pass the stop on, give the workers ``STOP_GRACE_S`` to stop at a batch boundary,
    then kill what is left (its trial is retried, as for any dead worker)."""
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signum)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            log.warning("%s did not stop within %ss: killing it", p.name, STOP_GRACE_S)
            p.kill()
            p.join()


# --------------------------------------------------------------------------- GPUs


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices or
    UUIDs); without it, every GPU torch counts (none on a machine without CUDA)."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [d.strip() for d in named.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_for_worker(index: int, gpus: Sequence[str]) -> str | None:
    """Worker ``index``'s GPU: one each, round the visible ones (worker i: GPU i mod count)."""
    return gpus[index % len(gpus)] if gpus else None


@contextlib.contextmanager
def _sees_only(gpu: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES for a child started inside the block (it inherits the
    environment at start, before it can import torch); this process's is put back."""
    if gpu is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def run_workers(settings: SweepSettings, on_progress: Callable[[], None] | None = None) -> None:
    """Worker 0 in this process when alone; otherwise ``n_jobs`` spawned processes.
    ``on_progress`` is called after each trial here, or every ``POLL_S`` while workers run."""
    if settings.n_jobs == 1:
        run_worker(settings, 0, on_progress)
        return
    # On GPUs, one trial per GPU at a time: worker i sees only GPU i mod count.
    gpus = visible_gpus()
    if gpus:
        log.info("%d workers over %d GPU(s)", settings.n_jobs, len(gpus))
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker_entry,
            args=(settings, i, settings.base["log_dir"], os.getpid()),
            name=f"sweep-worker-{i}",
        )
        for i in range(settings.n_jobs)
    ]
    for i, p in enumerate(procs):
        with _sees_only(gpu_for_worker(i, gpus)):
            p.start()
    try:
        while any(p.is_alive() for p in procs):
            multiprocessing.connection.wait([p.sentinel for p in procs], timeout=POLL_S)
            if on_progress is not None:
                on_progress()
            if stop.requested():
                stopped = stop.stopped("")
                _stop_workers(procs, stopped.signum)
                raise stopped
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    bad = [p.name for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise PipelineError(
            f"sweep worker(s) {', '.join(bad)} exited abnormally; see {settings.base['log_dir']}"
        )
