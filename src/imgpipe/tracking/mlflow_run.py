"""One MLflow run's life: created (or resumed) on a background thread, one batch per epoch,
the model, and an end status that matches how training ended."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imgpipe.errors import PipelineError
from imgpipe.redact import redact_url
from imgpipe.tracking.cost import CostMeter
from imgpipe.tracking.store import ensure_experiment

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
    metric_names: Sequence[str] = ()  # on resume, the steps already logged are read for these
    params: Mapping[str, Any] = field(default_factory=dict)  # logged once, for a new run
    dicts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # JSON artifacts
    autolog: bool = False
    system_metrics: bool = False


class MlflowRun:
    """Started with ``start()``; the first call that needs the run waits for it."""

    def __init__(self, spec: RunSpec, cost: CostMeter) -> None:
        self.spec = spec
        self.cost = cost
        self.run_id: str | None = None
        self._client: Any = None
        self._fluent = False  # autolog / system metrics need MLflow's fluent active run
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        # On resume: steps MLflow already holds per metric, so no epoch is logged twice.
        self._logged_steps: dict[str, set[int]] = {}

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
                self._start_error = exc

    def _create_or_reopen(self) -> None:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Param

        spec = self.spec
        self._client = client = MlflowClient(spec.tracking_uri)
        try:
            experiment_id = ensure_experiment(spec.tracking_uri, spec.experiment_name)
        except mlflow.exceptions.MlflowException as exc:
            raise PipelineError(
                f"MLflow store {redact_url(spec.tracking_uri)}: cannot use experiment "
                f"{spec.experiment_name!r} ({exc.message.splitlines()[0]})"
            ) from None
        if spec.resume_run_id:
            self._check_resumable(spec.resume_run_id)
            client.update_run(spec.resume_run_id, status="RUNNING")
            self.run_id = spec.resume_run_id
        else:
            tags = dict(spec.tags)
            if spec.parent_run_id:
                tags["mlflow.parentRunId"] = spec.parent_run_id
            run = client.create_run(experiment_id, run_name=spec.run_name, tags=tags)
            self.run_id = run.info.run_id
            if spec.params:
                client.log_batch(
                    self.run_id,
                    params=[Param(k, str(_param_value(v))) for k, v in spec.params.items()],
                )
            for name, data in spec.dicts.items():
                client.log_dict(self.run_id, dict(data), name)
        log.info(
            "MLflow run %s (%s) in experiment %r at %s",
            self.run_id,
            "resumed" if spec.resume_run_id else "new",
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

    def wait(self) -> str | None:
        """Block until the run exists (re-raising what stopped it); return its id."""
        if self._starter is not None:
            self._starter.join()
            self._starter = None
            if self._start_error is not None:
                raise self._start_error
            if self.spec.autolog or self.spec.system_metrics:
                import mlflow

                mlflow.set_tracking_uri(self.spec.tracking_uri)
                if self.spec.autolog:
                    mlflow.autolog(log_models=False, silent=True)
                mlflow.start_run(run_id=self.run_id, log_system_metrics=self.spec.system_metrics)
                self._fluent = True
        return self.run_id

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.wait()
        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        """One batch request per epoch; steps the run already holds are not sent again."""
        from mlflow.entities import Metric

        self.wait()
        fresh = {k: v for k, v in metrics.items() if step not in self._logged_steps.get(k, ())}
        if len(fresh) < len(metrics):
            log.info("epoch %d is already in MLflow run %s: not logged again", step, self.run_id)
        if fresh:
            now = int(time.time() * 1000)
            self._client.log_batch(
                self.run_id, metrics=[Metric(k, v, now, step) for k, v in fresh.items()]
            )

    def log_model(self, model: Any, example: Any) -> None:
        """The trained model as an MLflow model (loadable with mlflow.pytorch.load_model)."""
        import mlflow
        import torch

        self.wait()
        model = model.cpu().eval()
        mlflow.set_tracking_uri(self.spec.tracking_uri)
        # "pt2" (torch.export) loads without running pickled code; it traces with the example.
        # Explicit requirements: inferring them imports and inspects the whole env.
        # No serving-input validation: MLflow would load the model back and predict on the
        # example on every run; the project's tests load logged models through pyfunc and
        # predict instead. (MLflow also hands this keyword to the flavor's save: "pt2"
        # ignores it, "pickle" would not.)
        kwargs = {
            "name": "model",
            "input_example": example.cpu().numpy(),
            "serialization_format": "pt2",
            "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"],
            "validate_serving_input": False,
        }
        if self._fluent:
            mlflow.pytorch.log_model(model, **kwargs)
        else:
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(model, **kwargs)

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED; a run that never started has nothing to end."""
        if self._starter is not None:  # failed before the run was needed
            self._starter.join()
            self._starter = None
        if self._fluent:
            import mlflow

            mlflow.end_run(status=status)
        elif self.run_id and self._client is not None:
            self._client.set_terminated(self.run_id, status=status)


def _param_value(value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value
