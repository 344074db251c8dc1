"""Complete an MLflow run from its checkpoint, after a tracking outage outlasted training.

    imgpipe sync models                   # or: make mlflow-sync
    imgpipe sync models --tracking-uri http://host:5000
    # a password goes in the environment, never on a command line:
    # MLFLOW_TRACKING_URI (the URL with it), or MLFLOW_TRACKING_USERNAME/_PASSWORD

The checkpoint is the source of truth for a run's history. This compares the run's
metric history in MLflow with the checkpoint's epochs and logs exactly the missing steps
into the same run; when the checkpoint finished its training, it logs the model from
``model.pt`` if the run has none and marks the run FINISHED. Run it twice: nothing is
logged twice. The tracking URI is ``--tracking-uri``, else the one the checkpoint was
trained with (unless its password was hidden there), else ``MLFLOW_TRACKING_URI``, else the
project's local store.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from imgpipe.errors import PipelineError
from imgpipe.redact import redact_url

log = logging.getLogger(__name__)


def sync_command(checkpoint_dir: str | None, tracking_uri: str) -> str:
    """The command that completes a run later from its checkpoint (printed, so no password)."""
    folder = Path(checkpoint_dir or "models").resolve()
    command = f"imgpipe sync {shlex.quote(str(folder))}"
    if redact_url(tracking_uri) != tracking_uri:
        command += " (with MLFLOW_TRACKING_URI set to the server's URL with its password)"
    return command


def tracking_uri_for(config: dict, given: str | None) -> str:
    from imgpipe.tracking.store import resolve_tracking_uri

    if given:
        return given
    trained = config.get("mlflow_tracking_uri")
    if trained and "***" not in trained:
        return trained
    if trained and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise PipelineError(
            f"the checkpoint's tracking URI {trained} hides its password: "
            "set MLFLOW_TRACKING_URI to the URL with its password"
        )
    return resolve_tracking_uri(None)


def sync(checkpoint_dir: str | os.PathLike[str], tracking_uri: str | None = None) -> str:
    """Log what the run lacks; return the one line that says what was done."""
    from imgpipe import checkpoint
    from imgpipe.tracking.outbox import missing_batches, send_failures
    from imgpipe.tracking.store import check_tracking_uri, hide_secret_urls, prepare_store

    folder = Path(checkpoint_dir)
    found = checkpoint.load_latest(folder)
    if found is None:
        raise PipelineError(f"{folder}: no checkpoint to sync from")
    state, path = found
    if not state.run_id and not state.run_key:
        raise PipelineError(f"{path}: the checkpoint names no MLflow run (setup_mlflow=false?)")
    uri = tracking_uri_for(state.config, tracking_uri)
    check_tracking_uri(uri)
    prepare_store(uri)
    hide_secret_urls(uri)
    shown = redact_url(uri)
    try:
        return _complete(state, folder, uri, missing_batches, send_failures())
    except send_failures() as exc:
        from imgpipe.tracking.outbox import failure_reason

        raise PipelineError(
            f"MLflow run {state.run_id or '(by its key)'} at {shown}: {failure_reason(exc, uri)}; "
            "nothing is lost, run this again"
        ) from None


def _complete(state, folder: Path, uri: str, missing_batches, failures) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    run_id = state.run_id or _run_by_key(client, state, folder, uri)
    try:
        run = client.get_run(run_id)
    except failures:
        raise PipelineError(
            f"MLflow run {run_id} (from {folder}) is not in {redact_url(uri)}; "
            "pass the server that holds it with --tracking-uri"
        ) from None
    names = sorted({name for entry in state.history for name in entry["metrics"]})
    logged = {name: {m.step for m in client.get_metric_history(run_id, name)} for name in names}
    batches = missing_batches(state.history, logged)
    for batch in batches:  # one request per epoch, in order: a failure leaves a clean prefix
        client.log_batch(
            run_id,
            metrics=[
                Metric(k, v, batch.timestamp_ms, batch.step) for k, v in batch.metrics.items()
            ],
        )
    done = [f"{len(batches)} epoch(s) logged" if batches else "no epoch missing"]
    finished = state.epoch >= int(state.config.get("epochs", state.epoch))
    model_file = folder / "model.pt"
    if not finished:
        done.append(
            f"the checkpoint stops at epoch {state.epoch} of {state.config.get('epochs')}: "
            "resume training (resume=true) to finish the run"
        )
    elif not _has_model(client, run):
        if not model_file.is_file():
            raise PipelineError(f"{model_file}: missing, so the run's model cannot be logged")
        model_id = _log_model_file(model_file, uri, run_id)
        done.append("the model logged")
        if name := state.config.get("mlflow_registered_model_name"):  # as training would have
            from imgpipe.tracking.registry import register

            version = register(client, name, run_id, model_id=model_id)
            done.append(f"registered as model {name!r} version {version.number}")
    if finished and run.info.status != "FINISHED":
        client.set_terminated(run_id, status="FINISHED")
        done.append("status FINISHED")
    nothing = not batches and len(done) == 1 and finished
    state_text = "already complete, nothing logged" if nothing else "; ".join(done)
    return f"MLflow run {run_id} at {redact_url(uri)}: {state_text}"


def _run_by_key(client, state, folder: Path, uri: str) -> str:
    """The id of the run a checkpoint saved before its run's id was known belongs to: the
    run holding its creation key in the checkpoint's experiment."""
    from imgpipe.tracking.create import find_run_once

    name = state.config.get("mlflow_exp_name")
    experiment = client.get_experiment_by_name(name) if name else None
    run = find_run_once(client, [experiment.experiment_id], state.run_key) if experiment else None
    if run is None:
        raise PipelineError(
            f"{folder}: no MLflow run in {redact_url(uri)} holds the checkpoint's key "
            f"{state.run_key} (experiment {name!r}); resume training (resume=true) to make "
            "it, or pass the server that holds it with --tracking-uri"
        )
    return run.info.run_id


def _has_model(client, run) -> bool:
    """A finished logged model from this run (a failed upload leaves one that is not READY)."""
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    return any(str(m.status).endswith("READY") for m in models)


def _log_model_file(model_file: Path, uri: str, run_id: str) -> str:
    """Log model.pt as the run would have (checked first: the factory rebuilds it and its
    digest holds); its model id."""
    import mlflow

    from imgpipe.models import load_model_file
    from imgpipe.tracking.model_files import log_model_file

    load_model_file(model_file)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return log_model_file(model_file)
