"""One MLflow run's life: created (or resumed) on a background thread, one batch per epoch
sent through the outbox (``outbox``: off the training thread, kept through outages), the
model, and an end status that matches how training ended.

A server that is gone at the end is waited for ``outage_wait_s``; after that the run ends
without it: one line names what is missing and the command that adds it later
(``imgpipe sync``), and training still succeeds."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe.errors import PipelineError
from imgpipe.redact import redact_url
from imgpipe.tracking.cost import CostMeter
from imgpipe.tracking.create import create_run_once, find_run_once, refusal
from imgpipe.tracking.outbox import Batch, Outbox, missing_batches, send_failures
from imgpipe.tracking.store import ensure_experiment, hide_secret_urls, prepare_store
from imgpipe.tracking.sync import sync_command

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """What the run is: where it is stored, what it is called and what it starts with."""

    tracking_uri: str  # resolved (imgpipe.tracking.store.resolve_tracking_uri)
    experiment_name: str
    run_name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None
    resume_run_id: str | None = None  # continue this run (from a checkpoint)
    # The creation key (tracking.create), chosen by the trainer and kept in its checkpoints:
    # without ``resume_run_id``, a run holding it is continued, else one is created with it.
    run_key: str | None = None
    metric_names: Sequence[str] = ()  # on resume, the steps already logged are read for these
    params: Mapping[str, Any] = field(default_factory=dict)  # logged once, for a new run
    dicts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # JSON artifacts
    autolog: bool = False
    system_metrics: bool = False
    outage_wait_s: float = 120.0  # at the end, how long to wait for a server that is gone
    checkpoint_dir: str | None = None  # named in the command that completes the run later
    registered_model_name: str | None = None  # register the logged model under this name


class MlflowRun:
    """Started with ``start()``. Epochs and tags logged while the run is being made are
    kept until it is open; ``wait`` (the model, the end) blocks for it."""

    def __init__(self, spec: RunSpec, cost: CostMeter) -> None:
        self.spec = spec
        self.cost = cost
        self.run_id: str | None = None  # set once the run is made (params and all)
        self._client: Any = None
        self._fluent = False  # autolog / system metrics need MLflow's fluent active run
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        # On resume: steps MLflow already holds per metric, so no epoch is logged twice.
        self._logged_steps: dict[str, set[int]] = {}
        self._outbox: Outbox | None = None  # made by the starter (its client opens the store)
        self._opened = False  # the replayed and early batches are in the outbox
        self._replay: list[Mapping[str, Any]] = []  # the checkpoint's epochs, on resume
        self._early: list[Batch] = []  # logged while the run was being made
        # The model: logged on a thread of its own as soon as it is saved (``log_model``).
        self._model_file: Path | None = None
        self._model_thread: threading.Thread | None = None
        self._model_id: str | None = None
        self._model_error: BaseException | None = None
        self._importing: threading.Thread | None = None  # the model's imports, loading

    def start(self) -> None:
        """Create or reopen the run on a thread: the first epoch trains meanwhile (torch
        releases the GIL)."""
        self._starter = threading.Thread(
            target=self._start_guarded, name="mlflow-start", daemon=True
        )
        self._starter.start()

    def _start_guarded(self) -> None:
        with self.cost.background():
            try:
                self._create_or_reopen()
            except BaseException as exc:  # re-raised in the training thread by wait()
                self._start_error = refusal(exc, self.spec.tracking_uri, self.spec.experiment_name)
                return
        # What logging the model imports, loaded on a thread of its own while training goes
        # on: at the end it was most of the training thread's wait for the model. Later
        # MLflow imports wait for it (``_imports_loaded``): two threads importing MLflow's
        # modules at once may see one half-made (bench/NOTES.md).
        self._importing = threading.Thread(target=self._load_model_logging, name="mlflow-load")
        self._importing.start()

    def _imports_loaded(self) -> None:
        if self._importing is not None:
            self._importing.join()

    def _load_model_logging(self) -> None:
        with self.cost.background(), contextlib.suppress(Exception):
            import mlflow.pyfunc  # noqa: F401
            from mlflow.models import Model  # noqa: F401

            from imgpipe.tracking import model_files  # noqa: F401

    def _create_or_reopen(self) -> None:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Param

        spec = self.spec
        hide_secret_urls(spec.tracking_uri)
        prepare_store(spec.tracking_uri)  # a new store: made here, off the training thread
        self._client = client = MlflowClient(spec.tracking_uri)
        try:
            experiment_id = ensure_experiment(spec.tracking_uri, spec.experiment_name)
        except mlflow.exceptions.MlflowException as exc:
            raise PipelineError(
                f"MLflow store {redact_url(spec.tracking_uri)}: cannot use experiment "
                f"{spec.experiment_name!r} ({exc.message.splitlines()[0]})"
            ) from None
        run_id, found = spec.resume_run_id, None
        if not run_id and spec.run_key:  # a checkpoint saved before its run's id was known
            found = find_run_once(client, [experiment_id], spec.run_key)
            run_id = found.info.run_id if found is not None else None
        resumed = run_id is not None
        if run_id:
            self._check_resumable(run_id)
            client.update_run(run_id, status="RUNNING")
        else:
            tags = dict(spec.tags)
            if spec.parent_run_id:
                tags["mlflow.parentRunId"] = spec.parent_run_id
            run = create_run_once(client, experiment_id, spec.run_name, tags, spec.run_key)
            run_id = run.info.run_id
        if not resumed or (found is not None and not found.data.params):
            # a new run, or one killed before its params were logged
            if spec.params:
                client.log_batch(
                    run_id, params=[Param(k, str(_param_value(v))) for k, v in spec.params.items()]
                )
            for name, data in spec.dicts.items():
                client.log_dict(run_id, dict(data), name)
        self._outbox = Outbox(spec.tracking_uri, run_id, self.cost)
        self.run_id = run_id  # the trainer's checkpoints record it from now on
        log.info(
            "MLflow run %s (%s) in experiment %r at %s",
            self.run_id,
            "resumed" if resumed else "new",
            spec.experiment_name,
            redact_url(spec.tracking_uri),
        )

    def _check_resumable(self, run_id: str) -> None:
        import mlflow

        try:
            self._client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise PipelineError(
                f"the checkpoint's MLflow run {run_id} is not in "
                f"{redact_url(self.spec.tracking_uri)}; "
                "point mlflow_tracking_uri at the store that holds it, or set resume=false"
            ) from None
        for name in self.spec.metric_names:
            history = self._client.get_metric_history(run_id, name)
            self._logged_steps[name] = {m.step for m in history}

    def starting(self) -> bool:
        """Whether the run is still being made (its starter thread busy)."""
        return self._starter is not None and self._starter.is_alive()

    def wait(self) -> str | None:
        """Block until the run exists (re-raising what stopped it); return its id."""
        if self._starter is not None:
            self._starter.join()
            self._starter = None
            if self._start_error is not None:
                raise self._start_error
            if self.spec.autolog or self.spec.system_metrics:
                self._imports_loaded()  # autolog imports MLflow's flavors
                import mlflow

                mlflow.set_tracking_uri(self.spec.tracking_uri)
                if self.spec.autolog:
                    mlflow.autolog(log_models=False, silent=True)
                mlflow.start_run(run_id=self.run_id, log_system_metrics=self.spec.system_metrics)
                self._fluent = True
            self._open_outbox()
        return self.run_id

    def _open_outbox(self) -> None:
        """Start sending; on resume, first the checkpoint's epochs the run lacks (a kill or
        an outage before the last checkpoint left them out of MLflow)."""
        if self._opened or self._outbox is None:
            return
        self._opened = True
        for batch in missing_batches(self._replay, self._logged_steps):
            log.info("epoch %s is missing from MLflow run %s: sent now", batch.step, self.run_id)
            self._outbox.put(batch)
            for name in batch.metrics:
                self._logged_steps.setdefault(name, set()).add(batch.step or 0)
        early, self._early = self._early, []
        for batch in early:
            self._put(batch)

    def replay(self, history: Sequence[Mapping[str, Any]]) -> None:
        """The resumed checkpoint's epochs: those the run lacks are sent once it is open."""
        self._replay = list(history)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._send(Batch(None, tags=dict(tags)))

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        """One batch per epoch, queued; steps the run already holds are not sent again."""
        self._send(Batch(step, dict(metrics)))

    def _send(self, batch: Batch) -> None:
        """Into the outbox; while the run is being made, kept for it: on a short epoch,
        MLflow's import, a new store's migration and the run's creation outlast it, and
        the training thread must not wait for them (what stopped the run is raised at the
        first epoch after)."""
        if self.starting():
            self._early.append(batch)
            return
        self.wait()
        self._put(batch)

    def _put(self, batch: Batch) -> None:
        if batch.step is not None:
            step, metrics = batch.step, batch.metrics
            batch.metrics = {
                k: v for k, v in metrics.items() if step not in self._logged_steps.get(k, ())
            }
            if len(batch.metrics) < len(metrics):
                log.info(
                    "epoch %d is already in MLflow run %s: not logged again", step, self.run_id
                )
            if not batch.metrics:
                return
        assert self._outbox is not None
        self._outbox.put(batch)

    def log_model(self, model_file: str | os.PathLike[str]) -> None:
        """Log ``model_file`` (the saved model.pt) as the run's MLflow model, and register
        it, on a thread of its own: the training thread goes on to its last writes, and
        ``end`` waits for this before the run's status is set (tracking.model_files)."""
        self._model_file = Path(model_file)
        # A resumed run that had already reached its epochs logs no epoch first: the run
        # must exist (its starter done) before the model can go into it.
        self.wait()
        if self.run_id is None or self._client is None:
            return  # the run never started: ``end`` says what is missing
        self._model_thread = threading.Thread(
            target=self._log_model_guarded, name="mlflow-model", daemon=True
        )
        self._model_thread.start()

    def _log_model_guarded(self) -> None:
        self._imports_loaded()
        with self.cost.background():
            try:
                assert self._model_file is not None
                self._model_id = self._log_model(self._model_file)
            except BaseException as exc:  # judged by ``end`` on the training thread
                self._model_error = exc
                return
            self._register(self._model_id)

    def _model_logged(self, wait_s: float) -> bool:
        """Wait up to ``wait_s`` for the model's thread; whether the model is in the run.
        An outage (or a thread still retrying) leaves it to the sync command; anything
        else the thread raised is raised here."""
        if self._model_thread is None:
            return False
        self._model_thread.join(wait_s)
        if self._model_thread.is_alive():
            return False
        self._model_thread = None
        error, self._model_error = self._model_error, None
        if error is not None and not isinstance(error, send_failures()):
            raise error
        return self._model_id is not None

    def end(self, status: str) -> None:
        """Deliver what is queued, log the model, set the status (FINISHED, FAILED or
        KILLED). While the server is gone this waits ``outage_wait_s`` (a few seconds at
        most for a failed or stopped run, whose grace is short) and then leaves the rest,
        said in one line, to the sync command; it never raises for an outage."""
        if self._starter is not None:  # ended before the run was needed
            self._starter.join()
            self._starter = None
            if self._start_error is not None and status == "FINISHED":
                raise self._start_error  # training ended before the run failed to start
        if not self.run_id or self._client is None:
            return
        self._open_outbox()
        assert self._outbox is not None
        wait_s = (
            self.spec.outage_wait_s if status == "FINISHED" else min(self.spec.outage_wait_s, 5)
        )
        complete = self._outbox.drain(wait_s)
        self._outbox.close()
        model_missing = self._model_file is not None and not self._model_logged(wait_s)
        complete = complete and not model_missing
        if complete:
            try:
                self._set_status(status)
                return
            except send_failures():
                pass
        self._forget_fluent_run()
        log.warning(
            "MLflow run %s at %s is incomplete (%s; status %s not set): the checkpoint, "
            "model.pt and dvclive are complete; add the rest later with: %s",
            self.run_id,
            redact_url(self.spec.tracking_uri),
            _missing(self._outbox.pending_steps(), model_missing),
            status,
            sync_command(self.spec.checkpoint_dir, self.spec.tracking_uri),
        )

    def _log_model(self, model_file: Path) -> str:
        """Log the model into the run; its logged model's id. On this thread the run is
        made active (MLflow's active run is per thread); ending that ``with`` marks the run
        FINISHED, which ``end`` then sets to how training ended."""
        import mlflow

        from imgpipe.tracking.model_files import log_model_file

        mlflow.set_tracking_uri(self.spec.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            return log_model_file(model_file)

    def _register(self, model_id: str) -> None:
        """The model as a new version of ``registered_model_name`` (no alias moves). A
        refusal is one warning: the run is complete, and the command can register it later."""
        name = self.spec.registered_model_name
        if not name or self.run_id is None:
            return
        from imgpipe.tracking.registry import register_trained

        try:
            register_trained(self.spec.tracking_uri, name, self.run_id, model_id)
        except PipelineError as exc:
            log.warning(
                "%s; register it later with: imgpipe register --run %s",
                exc,
                self.run_id,
            )

    def _set_status(self, status: str) -> None:
        if self._fluent:
            import mlflow

            self._fluent = False
            mlflow.end_run(status=status)
        else:
            self._client.set_terminated(self.run_id, status=status)

    def _forget_fluent_run(self) -> None:
        """Leave no fluent run for MLflow's exit hook, which would try the server again."""
        if self._fluent:
            import mlflow

            self._fluent = False
            with contextlib.suppress(*send_failures()):
                mlflow.end_run()


def _missing(steps: list[int], model: bool) -> str:
    parts = []
    if steps:
        span = f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0])
        parts.append(f"epochs {span} unsent" if len(steps) > 1 else f"epoch {span} unsent")
    if model:
        parts.append("the model unlogged")
    return ", ".join(parts) or "nothing unsent"


def _param_value(value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value
