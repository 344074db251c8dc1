"""Optuna sweeps configured by the ``hydra.sweeper`` block of conf/train_model.yaml.

``python -u src/train_model.py --multirun`` (and ``make sweep``, the DVC stage)
lands here. The config block, the search-space syntax (``range``, ``choice``,
``interval``, ``tag(log, ...)``) and ``optimization_results.yaml`` are those of
Hydra's Optuna sweeper, parsed with the sweeper's own functions. The loop is
ours, because the sweeper's waits for the slowest trial of each batch, runs
``n_jobs`` in one process, and counts ``n_trials`` per process:

- every worker is a process with its share of the CPU threads, and takes the
  next trial as soon as it finishes one;
- the study lives in Optuna's storage (SQLite by default, PostgreSQL across
  machines): it is the only coordinator. Workers anywhere stop when the study
  holds ``n_trials`` finished trials in total;
- a trial whose worker died is failed (at once when the process was on this
  machine, after the heartbeat's grace period otherwise) and retried with the
  same params, resuming its own checkpoint;
- SIGTERM/SIGINT to the main process stops every worker at a batch boundary
  (``worker.run_workers``); their trials are queued to resume on the next run.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

from imgpipe import progress
from imgpipe.redact import redact_url
from imgpipe.stop import Stopped
from imgpipe.sweep.results import completed_ms, result_paths, write_results
from imgpipe.sweep.settings import SweepSettings, load_settings
from imgpipe.sweep.study import census, create_or_load_study, open_storage, prepare_study
from imgpipe.sweep.worker import run_workers
from imgpipe.tracking.parent import finish_parent_run

__all__ = ["SweepSettings", "load_settings", "run_sweep"]

log = logging.getLogger(__name__)
# Heartbeats and retries are "experimental" in Optuna since 2.x; we rely on them on purpose.
warnings.filterwarnings(
    "ignore", message=r".*(is experimental \(supported from v|is an experimental feature)"
)
warnings.filterwarnings(
    "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
)


def run_sweep(settings: SweepSettings) -> dict[str, Any]:
    """Open (or create) the study, run workers until it is done, write the results."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(settings.storage)
    study, created = create_or_load_study(settings, storage)
    prepare_study(settings, study, created)
    log.info(
        "sweep %r in %s: %d/%d trials finished, %d worker(s) x %d thread(s), hptuning_tag=%s",
        settings.study_name,
        redact_url(settings.storage),
        census(study).finished,
        settings.n_trials,
        settings.n_jobs,
        settings.threads_per_worker,
        settings.hptuning_tag,
    )
    best = _run_and_finish(settings, study)
    failed = sum(1 for t in study.get_trials(deepcopy=False) if "failure" in t.user_attrs)
    log.info(
        "sweep done: best trial %d %s -> %s (%d failed); results in %s",
        best["trial"],
        best["params"],
        best["values"],
        failed,
        settings.results_dir,
    )
    _register_best(settings, best)
    return best


def _register_best(settings: SweepSettings, best: dict[str, Any]) -> None:
    """With mlflow_registered_model_name set: the best trial's model becomes a version of
    that name, and ``champion`` moves to it when it beats the champion on the first
    objective (imgpipe.tracking.registry)."""
    name = settings.base.get("mlflow_registered_model_name")
    if not name or not settings.base.get("setup_mlflow", True):
        return
    from imgpipe.tracking.registry import register_sweep_best
    from imgpipe.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(settings.base["mlflow_tracking_uri"])
    register_sweep_best(uri, name, best, settings.directions[0])


def _run_and_finish(settings: SweepSettings, study: Any) -> dict[str, Any]:
    """Run the workers and write the results; end the parent run however that went."""
    status = "FAILED"
    best = None
    best_at_ms = 0
    try:
        with progress.sweep_bar(settings.n_trials) as bar:
            run_workers(settings, on_progress=lambda: _show_progress(bar, study, settings))
        best = write_results(study, settings)
        best_at_ms = completed_ms(study, best)
        status = "FINISHED"
    except (KeyboardInterrupt, Stopped):
        status = "KILLED"
        raise
    finally:
        finish_parent_run(
            settings.base["mlflow_tracking_uri"],
            settings.parent_run_id,
            best,
            status,
            best_at_ms=best_at_ms,
            artifacts=result_paths(settings),
            wait_s=float(settings.base["mlflow_outage_wait_s"]),
        )
    return best


def _show_progress(bar: progress.SweepBar, study: Any, settings: SweepSettings) -> None:
    """Trials done (as the workers count them) and the best first objective so far."""
    if not bar.active:
        return
    from optuna.trial import TrialState

    values = [
        t.values[0]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.values and math.isfinite(t.values[0])
    ]
    pick = max if settings.directions[0] == "maximize" else min
    names = getattr(study, "metric_names", None) or settings.directions
    bar.update(census(study).finished, pick(values) if values else None, names[0])


def main(config_name: str, argv: list[str]) -> None:
    """``python -u src/train_model.py --multirun [overrides]``: the sweep as a command."""
    from imgpipe.cli import fail, stopped
    from imgpipe.errors import PipelineError
    from imgpipe.logs import setup_logging

    try:
        settings = load_settings(config_name, argv)
        setup_logging(settings.base["log_dir"])
        run_sweep(settings)
    except PipelineError as exc:
        fail(exc)
    except Stopped as exc:  # stopped trials are queued: they resume their own checkpoints
        stopped(Stopped(exc.signum, ": run the sweep again to continue it"))
