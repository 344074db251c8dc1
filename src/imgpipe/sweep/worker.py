"""Workers: each takes trials from the study and trains them (``trial``) until the study is
done; the ask/tell loop with its heartbeat; worker processes and their GPUs."""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from imgpipe import progress, stop
from imgpipe.errors import PipelineError
from imgpipe.redact import redact_url
from imgpipe.sweep.pruning import optuna_pruner
from imgpipe.sweep.resilience import (
    Heartbeat,
    StorageUnreachable,
    recently_cut_off,
    retrying,
)
from imgpipe.sweep.settings import SweepSettings, search_distributions
from imgpipe.sweep.study import (
    census,
    claiming,
    fail_dead_local_trials,
    grace_seconds,
    open_storage,
)
from imgpipe.sweep.trial import make_sampler, run_trial, trial_seed
from imgpipe.tracking.store import HPTUNING_TAG_ENV

log = logging.getLogger(__package__)  # the sweep's lines read "imgpipe.sweep: ..."

POLL_S = 1.0
# `docker stop` kills after 10 s, Kubernetes after 30 s: workers stop at a batch boundary
# long before this, and the main process still has time to end the parent run.
STOP_GRACE_S = 7.0
UNREACHABLE_EXIT = 3  # a worker that gave up on the study's database (one line in the main)


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
        look_after_dead_trials(study, storage, settings.storage)
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


def look_after_dead_trials(study, storage, url: str) -> None:
    """Fail (and retry) trials whose worker died: on this machine at once, elsewhere once
    their heartbeat is older than the grace period. Not right after this worker itself lost
    the database: the others' heartbeats could not arrive either. Each dead trial is failed
    and retried by one worker only, on every storage (``claiming``)."""
    import optuna
    from optuna.storages import RDBStorage

    with claiming(url):
        if isinstance(storage, RDBStorage) and not recently_cut_off(grace_seconds()):
            retrying(lambda: optuna.storages.fail_stale_trials(study), what="failing stale trials")
        retrying(lambda: fail_dead_local_trials(study, storage), what="failing dead trials")


def take_trial(study, url: str):
    """The next trial for this worker: a waiting one (a retry, an enqueued one) or a new
    one. A waiting trial goes to exactly one worker, on every storage (``claiming``)."""
    with claiming(url):
        return retrying(study.ask, what="asking for a trial")


def run_one(study, storage, settings: SweepSettings, space: dict[str, Any], index: int) -> None:
    """Ask the study for a trial, train it with its heartbeat kept up, tell the outcome. Every
    storage call is retried through an outage; telling the end is safe to repeat."""
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    trial = take_trial(study, settings.storage)
    beat: Any = contextlib.nullcontext()
    if isinstance(storage, RDBStorage) and storage.get_heartbeat_interval():
        trial_id = retrying(
            lambda: storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(study.study_name), trial.number
            )
        )
        beat = Heartbeat(storage, trial_id, float(storage.get_heartbeat_interval()))

    def tell(values: Any = None, state: Any = None) -> None:
        with claiming(settings.storage):  # not at the moment a neighbour fails it as stale
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
    except StorageUnreachable as exc:
        log.error("worker %d: %s", index, exc)
        raise SystemExit(UNREACHABLE_EXIT) from None
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
    if any(p.exitcode == UNREACHABLE_EXIT for p in procs):
        raise StorageUnreachable(
            f"sweep storage {redact_url(settings.storage)} stayed unreachable; run the same "
            "command again to continue the study"
        )
    bad = [p.name for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise PipelineError(
            f"sweep worker(s) {', '.join(bad)} exited abnormally; see {settings.base['log_dir']}"
        )
