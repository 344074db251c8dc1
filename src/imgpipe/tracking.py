"""One Tracker for MLflow and dvclive: same metric names, one batched call per epoch."""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from imgpipe.errors import PipelineError

log = logging.getLogger(__name__)

HPTUNING_TAG_ENV = "MLFLOW_HPTUNING_TAG"


# --------------------------------------------------------------------------- URIs


def redact_url(url: str) -> str:
    """Hide the password of a URL (``scheme://user:***@host``) so it can be shown."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    query = _SECRET_QUERY.sub(r"\1=***", parts.query)
    if parts.password is None and query == parts.query:
        return url  # nothing secret; urlunsplit would also mangle sqlite:////abs/path
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_SECRET_QUERY = re.compile(r"(?i)\b(password|passwd|pwd|token|secret)=[^&]*")


def project_root() -> Path:
    """Where the local store lives. DVC_ROOT points at the real repository even when
    ``dvc exp run --temp/--queue`` runs the stage in a throw-away copy."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None) -> str:
    """Config key, else MLFLOW_TRACKING_URI, else the local SQLite store under mlruns/."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on a store we cannot use, before any data is loaded or trained."""
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        import requests

        url = uri.rstrip("/") + "/health"
        try:
            response = requests.get(url, timeout=timeout)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            raise PipelineError(
                f"MLflow tracking server {redact_url(uri)} is unreachable ({reason}); "
                "start one (`make mlflow-ui`) or unset mlflow_tracking_uri / MLFLOW_TRACKING_URI"
            ) from None
        if response.status_code != 200:
            raise PipelineError(
                f"MLflow tracking server {redact_url(uri)} answered HTTP "
                f"{response.status_code} on /health"
            )
    elif scheme == "sqlite":
        path = uri.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PipelineError(
                    f"cannot create the MLflow store {path}: {exc.strerror}"
                ) from None


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_tags() -> dict[str, str]:
    """Tags every run carries: sweep tag, git commit, DVC experiment name."""
    tags: dict[str, str] = {}
    if tag := os.environ.get(HPTUNING_TAG_ENV):
        tags["hptuning_tag"] = tag
    if commit := git_commit():
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = exp
    return tags


# --------------------------------------------------------------------------- Tracker

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _blocking(method: _Method) -> _Method:
    """Count the wall time the training thread spends in this call; a tracking call made
    inside another (``log_epoch`` waiting for the run, opening dvclive) counts once."""

    @functools.wraps(method)
    def wrapper(self: Tracker, *args: Any, **kwargs: Any) -> Any:
        if self._depth:
            return method(self, *args, **kwargs)
        self._depth += 1
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth -= 1
            self.blocking_s += time.perf_counter() - start

    return cast(_Method, wrapper)


class Tracker:
    """MLflow (optional) and dvclive (always) behind one small typed interface.

    Use as a context manager. Entering it starts the MLflow side (imports, store,
    experiment, run, initial params and artifacts) on a background thread, so the
    first epoch trains meanwhile (torch releases the GIL); the first call that
    needs the run waits for it. The run ends FINISHED, FAILED or KILLED to match
    how the block ended, and dvclive writes its summary.
    """

    def __init__(
        self,
        *,
        mlflow_enabled: bool,
        tracking_uri: str | None,
        experiment_name: str,
        run_name: str,
        live_dir: str | os.PathLike[str],
        tags: Mapping[str, str] | None = None,
        autolog: bool = False,
        system_metrics: bool = False,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        metric_names: Sequence[str] = (),
        params: Mapping[str, Any] | None = None,
        dicts: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.mlflow_enabled = mlflow_enabled
        self.tracking_uri = resolve_tracking_uri(tracking_uri) if mlflow_enabled else None
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.live_dir = Path(live_dir)
        self.tags = dict(tags or {})
        self.autolog = autolog
        self.system_metrics = system_metrics
        self.resume_run_id = resume_run_id
        self.parent_run_id = parent_run_id
        self.run_id: str | None = None
        self._params = dict(params or {})  # logged once, for a new run
        self._dicts = dict(dicts or {})
        self._live: Any = None
        self._client: Any = None
        self._fluent = False  # autolog / system metrics need MLflow's fluent active run
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        # On resume: steps MLflow already holds per metric, so no epoch is logged twice.
        self._logged_steps: dict[str, set[int]] = {}
        self._metric_names = tuple(metric_names)
        # What tracking costs the run: seconds the training thread spent in tracking calls,
        # and CPU seconds the start-up thread used while the first epoch trained. Where the
        # training thread waits for that thread, the two overlap: their sum is an upper bound.
        self.blocking_s = 0.0
        self.background_cpu_s = 0.0
        self._depth = 0

    @_blocking
    def __enter__(self) -> Tracker:
        if self.mlflow_enabled:
            self._starter = threading.Thread(
                target=self._start_guarded, name="mlflow-start", daemon=True
            )
            self._starter.start()
        return self

    def _start_guarded(self) -> None:
        cpu = time.thread_time()
        try:
            self._start_mlflow()
        except BaseException as exc:  # re-raised in the training thread by wait()
            self._start_error = exc
        finally:
            self.background_cpu_s += time.thread_time() - cpu

    def _start_mlflow(self) -> None:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = client = MlflowClient(self.tracking_uri)
        try:
            experiment_id = ensure_experiment(self.tracking_uri, self.experiment_name)
        except mlflow.exceptions.MlflowException as exc:
            raise PipelineError(
                f"MLflow store {redact_url(self.tracking_uri)}: cannot use experiment "
                f"{self.experiment_name!r} ({exc.message.splitlines()[0]})"
            ) from None
        if self.resume_run_id:
            self._check_resumable(self.resume_run_id)
            client.update_run(self.resume_run_id, status="RUNNING")
            self.run_id = self.resume_run_id
        else:
            tags = dict(self.tags)
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            if self._params:
                client.log_batch(
                    self.run_id,
                    params=[Param(k, str(_param_value(k, v))) for k, v in self._params.items()],
                )
            for name, data in self._dicts.items():
                client.log_dict(self.run_id, dict(data), name)
        log.info(
            "MLflow run %s (%s) in experiment %r at %s",
            self.run_id,
            "resumed" if self.resume_run_id else "new",
            self.experiment_name,
            redact_url(self.tracking_uri),
        )

    @_blocking
    def wait(self) -> str | None:
        """Block until the MLflow run exists (re-raising what stopped it); return its id."""
        if self._starter is not None:
            self._starter.join()
            self._starter = None
            if self._start_error is not None:
                raise self._start_error
            if self.autolog or self.system_metrics:
                import mlflow

                mlflow.set_tracking_uri(self.tracking_uri)
                if self.autolog:
                    mlflow.autolog(log_models=False, silent=True)
                mlflow.start_run(run_id=self.run_id, log_system_metrics=self.system_metrics)
                self._fluent = True
        return self.run_id

    @property
    @_blocking
    def live(self) -> Any:
        if self._live is None:
            from dvclive import Live

            # dvcyaml=None: dvc.yaml declares metrics and plots itself; dvclive must not
            # rewrite it. Always a fresh directory: on resume the history is replayed from
            # the checkpoint, right even after `dvc repro` deleted the old files or a kill
            # left extra rows.
            self._live = Live(
                dir=str(self.live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None
            )
        return self._live

    def _check_resumable(self, run_id: str) -> None:
        import mlflow

        try:
            self._client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise PipelineError(
                f"the checkpoint's MLflow run {run_id} is not in {redact_url(self.tracking_uri)}; "
                "point mlflow_tracking_uri at the store that holds it, or set resume=false"
            ) from None
        for name in self._metric_names:
            history = self._client.get_metric_history(run_id, name)
            self._logged_steps[name] = {m.step for m in history}

    @_blocking
    def replay(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Write already-completed epochs into dvclive (MLflow holds them already)."""
        for entry in history:
            self.live.step = entry["epoch"]
            for name, value in entry["metrics"].items():
                self.live.log_metric(name, value)
        if history:
            self.live.make_summary()

    @_blocking
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.end()
        if not self.mlflow_enabled:
            return
        if self._starter is not None:  # failed before the run was needed
            self._starter.join()
            self._starter = None
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        if self._fluent:
            import mlflow

            mlflow.end_run(status=status)
        elif self.run_id and self._client is not None:
            self._client.set_terminated(self.run_id, status=status)

    @_blocking
    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.mlflow_enabled:
            from mlflow.entities import RunTag

            self.wait()
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    @_blocking
    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log one epoch: a single MLflow batch request, and the dvclive step."""
        if self.mlflow_enabled:
            from mlflow.entities import Metric

            self.wait()
            fresh = {k: v for k, v in metrics.items() if step not in self._logged_steps.get(k, ())}
            if len(fresh) < len(metrics):
                log.info(
                    "epoch %d is already in MLflow run %s: not logged again", step, self.run_id
                )
            if fresh:
                now = int(time.time() * 1000)
                self._client.log_batch(
                    self.run_id, metrics=[Metric(k, v, now, step) for k, v in fresh.items()]
                )
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    @_blocking
    def log_confusion_matrix(self, actual: Sequence[str], predicted: Sequence[str]) -> None:
        self.live.log_sklearn_plot(
            "confusion_matrix", list(actual), list(predicted), name="confusion_matrix.json"
        )

    @_blocking
    def log_model(self, model: Any, example: Any) -> None:
        """Log the trained model as an MLflow model (loadable with mlflow.pytorch.load_model)."""
        if not self.mlflow_enabled:
            return
        import mlflow
        import torch

        self.wait()
        model = model.cpu().eval()
        mlflow.set_tracking_uri(self.tracking_uri)
        # "pt2" (torch.export) loads without running pickled code; it traces with the example.
        # Explicit requirements: inferring them imports and inspects the whole env (slow).
        # No serving-input validation: MLflow would load the model back and predict on the
        # example on every run (0.1-0.2 s, a third of what tracking costs a run); the
        # project's tests load logged models through pyfunc and predict instead. (MLflow
        # also hands this keyword to the flavor's save: "pt2" ignores it, "pickle" would not.)
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


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it once even when several processes race.

    A local SQLite store gets its artifacts beside the database: MLflow's default
    is ./mlruns under the *current* directory, which `dvc exp run --temp` throws away.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        location = (db.parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process won the race
            raise
        return client.get_experiment_by_name(name).experiment_id


def _param_value(key: str, value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value
