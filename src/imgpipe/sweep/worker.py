"""Workers: each takes trials from the study and trains them until the study is done."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from imgpipe import progress, stop
from imgpipe.config import TrainConfig, to_schema
from imgpipe.errors import PipelineError
from imgpipe.sweep.settings import SweepSettings, _distributions
from imgpipe.sweep.study import (
    MAX_RETRY,
    census,
    counts_towards_n_trials,
    fail_dead_local_trials,
    open_storage,
)
from imgpipe.tracking.store import HPTUNING_TAG_ENV

log = logging.getLogger(__package__)  # the sweep's lines read "imgpipe.sweep: ..."

POLL_S = 1.0
# `docker stop` kills after 10 s, Kubernetes after 30 s: workers stop at a batch boundary
# long before this, and the main process still has time to end the parent run.
STOP_GRACE_S = 7.0


# --------------------------------------------------------------------------- sampler


def worker_seed(settings: SweepSettings, index: int) -> int | None:
    """Worker 0 of a local study keeps the configured seed (reproducible); every other
    worker, and every worker on shared storage, mixes in its host, index and pid."""
    base = settings.sampler.get("seed")
    if base is None:
        return None
    if index == 0 and not settings.shared_storage:
        return int(base)
    key = f"{base}:{socket.gethostname()}:{index}:{os.getpid()}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


def make_sampler(settings: SweepSettings, index: int):
    """The configured sampler (``_target_`` must be an Optuna sampler) with this worker's seed."""
    import optuna
    from hydra.utils import get_class

    spec = dict(settings.sampler)
    target = spec.pop("_target_", "optuna.samplers.TPESampler")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)):
        raise PipelineError(f"hydra.sweeper.sampler._target_: {target} is not an Optuna sampler")
    spec["seed"] = worker_seed(settings, index)
    try:
        return cls(**spec)
    except TypeError as exc:
        raise PipelineError(f"hydra.sweeper.sampler: {exc}") from None


# --------------------------------------------------------------------------- one trial


def _trial_config(settings: SweepSettings, trial, params: dict[str, Any]) -> TrainConfig:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    home = Path(settings.study_dir) / "trials" / str(origin if origin is not None else trial.number)
    values = (
        settings.base
        | params
        | {
            "model_checkpoint_dir_path": str(home / "models"),
            "live_dir_path": str(home / "dvclive"),
            "live_images": False,  # nobody looks at a trial's; 1 s each (bench/NOTES.md)
            "mlflow_run_name": f"trial-{trial.number}",
            # Only the sweep registers, and only its best trial (imgpipe.tracking.registry).
            "mlflow_registered_model_name": None,
            # A retry continues its own trial's checkpoint; a new trial never reads another's.
            "resume": origin is not None,
        }
    )
    return to_schema(TrainConfig, values, f"trial {trial.number}")


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


def _train_trial(trial, settings: SweepSettings, study, distributions: dict[str, Any], index: int):
    """Draw the trial's params and train it; the TrainResult."""
    from imgpipe.train import train

    params = {name: trial._suggest(name, dist) for name, dist in distributions.items()}
    cfg = _trial_config(settings, study._storage.get_trial(trial._trial_id), params)
    log.info("trial %d (worker %d): %s", trial.number, index, params)
    return train(
        cfg,
        parent_run_id=settings.parent_run_id,
        tags={"trial_number": str(trial.number), "optuna_study": settings.study_name},
    )


def run_trial(
    trial, *, settings: SweepSettings, study, distributions: dict[str, Any], index: int
) -> tuple[float, ...]:
    """The objective: train one trial; its objectives, as many as the study has directions."""
    import optuna

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    if _is_surplus(study, trial, settings.n_trials):
        trial.set_user_attr("surplus", True)
        raise optuna.TrialPruned("study already has n_trials trials")
    started = time.perf_counter()
    try:
        result = _train_trial(trial, settings, study, distributions, index)
    except stop.Stopped:
        _retry_later(study, trial)
        raise
    except Exception as exc:  # Ctrl-C is not a failure: that trial is retried next time
        if run_id := getattr(exc, "run_id", None):
            trial.set_user_attr("mlflow_run_id", run_id)
        # Recorded before Optuna marks the trial FAIL: a genuine failure counts
        # towards n_trials, unlike a trial whose worker died (that one is retried).
        trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}"[:500])
        trial.set_user_attr("duration_s", round(time.perf_counter() - started, 3))
        log.warning("trial %d failed: %s", trial.number, exc)
        raise
    if result.run_id:
        trial.set_user_attr("mlflow_run_id", result.run_id)
    trial.set_user_attr("duration_s", round(time.perf_counter() - started, 3))
    trial.set_user_attr("train_s", round(result.timings.epochs_s, 3))
    # Reported, never optimised: the parent run shows the chosen trial's test metrics.
    trial.set_user_attr("test/loss", result.test_loss)
    trial.set_user_attr("test/accuracy", result.test_accuracy)
    values = result.objectives
    if not all(math.isfinite(v) for v in values):
        trial.set_user_attr("failure", f"non-finite objective {values}")  # Optuna fails it
    return values[: len(settings.directions)]


def _retry_later(study, trial) -> None:
    """A stopped trial is no failure: FAIL it without a ``failure`` (so it does not count
    towards n_trials) and queue its retry, which resumes the trial's own checkpoint. Done
    here, not left to the dead-pid check, so a worker on any machine is retried at once."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    storage = study._storage
    storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, storage.get_trial(trial._trial_id))
    log.warning("trial %d stopped: the next run of the sweep continues it", trial.number)


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
    study = optuna.load_study(
        study_name=settings.study_name, storage=storage, sampler=make_sampler(settings, index)
    )
    objective = functools.partial(
        run_trial,
        settings=settings,
        study=study,
        distributions=_distributions(settings.search_space),
        index=index,
    )
    if settings.hptuning_tag:
        os.environ[HPTUNING_TAG_ENV] = settings.hptuning_tag
    ran = 0
    while True:
        if ran > 3 * settings.n_trials + 10:  # a bug, not a sweep: never spin forever
            raise PipelineError(
                f"sweep worker {index} ran {ran} trials without the study finishing"
            )
        stop.check()  # between trials: no new one once a stop was asked for
        optuna.storages.fail_stale_trials(study)
        fail_dead_local_trials(study)
        now = census(study)
        if on_progress is not None:
            on_progress()
        if now.finished >= settings.n_trials:
            break
        if now.finished + now.running >= settings.n_trials and not now.waiting:
            time.sleep(POLL_S)  # the last trials are running elsewhere; one may still fail stale
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,))
        ran += 1
    return ran


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
