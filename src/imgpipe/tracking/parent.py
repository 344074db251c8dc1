"""A sweep's MLflow parent run: opened once per study (or reused), finished with the best trial."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imgpipe.redact import redact_url
from imgpipe.tracking.create import create_run_once
from imgpipe.tracking.outbox import FIRST_DELAY_S, MAX_DELAY_S, failure_reason, send_failures
from imgpipe.tracking.store import (
    check_tracking_uri,
    ensure_experiment,
    prepare_store,
    resolve_tracking_uri,
    run_tags,
)

# The parent run is the sweep's: its lines read "imgpipe.sweep: ..." as the sweep's others do.
log = logging.getLogger("imgpipe.sweep")


def open_parent_run(
    tracking_uri: str | None,
    experiment: str,
    study_name: str,
    *,
    hptuning_tag: str,
    params: Mapping[str, str],
    existing: str | None = None,
) -> str:
    """The parent run of ``study_name``: ``existing`` when this store has it, else a new one
    in ``experiment`` carrying ``params`` (``tracking_uri`` as configured: None for the default)."""
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    prepare_store(uri)
    client = MlflowClient(uri)
    if existing:
        try:
            client.get_run(existing)
            return existing
        except mlflow.exceptions.MlflowException:
            log.warning(
                "parent run %s of study %r is not in %s: starting a new one",
                existing,
                study_name,
                redact_url(uri),
            )
    experiment_id = ensure_experiment(uri, experiment)
    tags = run_tags() | {"hptuning_tag": hptuning_tag, "optuna_study": study_name}
    run = create_run_once(client, experiment_id, f"sweep-{study_name}", tags)
    client.log_batch(
        run.info.run_id,
        params=[mlflow.entities.Param(key, value) for key, value in params.items()],
    )
    return run.info.run_id


def finish_parent_run(
    tracking_uri: str | None,
    run_id: str | None,
    best: dict[str, Any] | None,
    status: str,
    *,
    best_at_ms: int,
    artifacts: Sequence[str | Path],
    wait_s: float = 120.0,
) -> None:
    """Record the best trial (and the result files ``artifacts``) on the parent run; end it.

    Its metrics: ``best/<objective>`` (val, what it was chosen on) and ``best/test/*``, the
    trial's test metrics, measured once at its end and never used for the choice.

    Every machine of a shared study gets here once the study is done, at about the same
    moment and with the same best trial, so the writes must be idempotent and tolerate each
    other: the tags and metrics go in one ``log_batch`` (MLflow's store retries concurrent
    tag inserts there, not in ``set_tag``) and the metrics carry the best trial's completion
    time ``best_at_ms`` as their timestamp, so the machines write identical rows and the run
    keeps one.

    Through a tracking outage, as training runs do: the writes are retried with backoff for
    ``wait_s`` seconds (``mlflow_outage_wait_s``); then one warning says what is missing and
    the sweep still ends well (its results folder is the record).
    """
    if not run_id:
        return
    uri = resolve_tracking_uri(tracking_uri)
    deadline = time.monotonic() + wait_s
    delay = FIRST_DELAY_S
    while True:
        try:
            _record(uri, run_id, best, status, best_at_ms, artifacts)
            return
        except send_failures() as exc:
            if time.monotonic() + delay > deadline:
                # The results folder holds everything; the writes are idempotent, so the
                # same command run again (the study is done: no trial runs) records it.
                log.warning(
                    "parent run %s at %s: best trial and status not recorded (%s); run the "
                    "sweep again once tracking answers to record them",
                    run_id,
                    redact_url(uri),
                    failure_reason(exc, uri),
                )
                return
            log.warning(
                "parent run %s: tracking unreachable (%s), retrying in %.0fs",
                run_id,
                failure_reason(exc, uri),
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)


def _record(
    uri: str,
    run_id: str,
    best: dict[str, Any] | None,
    status: str,
    best_at_ms: int,
    artifacts: Sequence[str | Path],
) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(uri)
    if best is not None:
        tags = {
            "best_trial": str(best["trial"]),
            "best_mlflow_run_id": best["mlflow_run_id"],
            **{f"best_params.{key}": str(value) for key, value in best["params"].items()},
        }
        client.log_batch(
            run_id,
            metrics=[
                Metric(f"best/{key}", value, best_at_ms, 0)
                for key, value in (best["values"] | best.get("test", {})).items()
            ],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        for path in artifacts:
            client.log_artifact(run_id, str(path), "sweep")
    client.set_terminated(run_id, status=status)
