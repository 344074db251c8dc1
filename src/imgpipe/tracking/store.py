"""Where runs are stored: the tracking URI (resolved once), its check, the experiment, run tags."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from imgpipe.errors import PipelineError
from imgpipe.redact import redact_url

HPTUNING_TAG_ENV = "MLFLOW_HPTUNING_TAG"


def project_root() -> Path:
    """Where the local store lives. DVC_ROOT points at the real repository even when
    ``dvc exp run --temp/--queue`` runs the stage in a throw-away copy."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None) -> str:
    """Config key, else MLFLOW_TRACKING_URI, else the local SQLite store under mlruns/.

    A plain folder (``./mlruns``, the seed's value, or ``file:`` URI) means the project's
    SQLite store inside it: MLflow 3's own file store refuses to run."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    parts = urlsplit(uri)
    if parts.scheme in ("", "file") or (len(parts.scheme) == 1 and uri[1:3] in (":\\", ":/")):
        folder = Path(parts.path if parts.scheme == "file" else uri)
        folder = folder if folder.is_absolute() else project_root() / folder
        db = folder.resolve() / "mlflow.db"
        if _FOLDER_SAID.setdefault(uri, False) is False:
            _FOLDER_SAID[uri] = True
            logging.getLogger(__name__).info(
                "MLflow tracking URI %s is a folder: using the SQLite store %s", uri, db
            )
        return f"sqlite:///{db}"
    return uri


_FOLDER_SAID: dict[str, bool] = {}  # the folder line once per process


def hide_secret_urls(tracking_uri: str) -> None:
    """MLflow prints the run's URL, password included, whenever a run ends: not for one
    that has a password."""
    if redact_url(tracking_uri) != tracking_uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on a store we cannot use, before any data is loaded or trained: a server
    that does not answer or refuses the login, a SQLite store whose folder cannot be made.
    A new SQLite store is created by ``prepare_store``, which the run's starter thread
    calls (off the training thread) and every other user of the store first."""
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
        check_login(uri, timeout)
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PipelineError(
                    f"cannot create the MLflow store {path}: {exc.strerror}"
                ) from None


def prepare_store(uri: str) -> None:
    """The store ready for use: a new SQLite store created and migrated (seconds: MLflow
    runs every alembic migration), once even when several processes or threads open it at
    the same time; nothing for a server or an existing store."""
    path = _sqlite_path(uri)
    if path is not None and not _made(path):
        create_sqlite_store_once(uri, path)


def create_sqlite_store_once(uri: str, path: Path) -> None:
    """Two processes that open a new SQLite store at once both run MLflow's migrations and
    one fails in alembic (seen with `dvc queue start -j 2` on a fresh project): the first
    creates it under a lock file beside it, the others wait, then find it made. (flock
    also keeps two threads of one process apart: each opens the lock file itself.) It is
    made under another name and renamed into place, so a process that ends during the
    migrations leaves no half-migrated store behind."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _made(path):
            return
        from mlflow import MlflowClient

        making = path.with_name(f".{path.name}.{os.getpid()}.new")
        making.unlink(missing_ok=True)
        # search_experiments creates and migrates the store
        MlflowClient(f"sqlite:///{making}").search_experiments(max_results=1)
        os.replace(making, path)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.split("sqlite:///", 1)[-1]
    return Path(path) if path and path != ":memory:" else None


def _made(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def check_login(uri: str, timeout: float = 5.0) -> None:
    """A server behind basic auth answers /health to anyone: one authenticated call, with
    the credentials MLflow's client will use (MLFLOW_TRACKING_USERNAME/PASSWORD or
    _TOKEN), finds a missing or wrong password before training starts."""
    import requests

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    auth = (user, password) if user and password else None
    headers = {"Authorization": f"Bearer {token}"} if token and not auth else {}
    try:
        response = requests.get(
            uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            auth=auth,
            headers=headers,
            timeout=timeout,
        )
    except requests.RequestException:
        return  # /health just answered: a blip; MLflow's own retries handle it
    who = f"user '{user}'" if auth else "no credentials"
    if response.status_code == 401:
        hint = (
            "check MLFLOW_TRACKING_PASSWORD"
            if auth
            else "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
        raise PipelineError(
            f"MLflow tracking server {redact_url(uri)} refused the login ({who}, HTTP 401): {hint}"
        )
    if response.status_code == 403:
        raise PipelineError(
            f"MLflow tracking server {redact_url(uri)}: {who} may not read experiments "
            "(HTTP 403): ask its admin for a permission"
        )


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


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it once even when several processes race.

    A local SQLite store gets its artifacts beside the database: MLflow's default
    is ./mlruns under the *current* directory, which `dvc exp run --temp` throws away.
    """
    import mlflow
    from mlflow import MlflowClient

    prepare_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage != "active":
        # MLflow keeps a deleted experiment's name (and refuses runs into it) until gc.
        raise PipelineError(
            f"MLflow store {redact_url(tracking_uri)}: experiment {name!r} is deleted; "
            f"restore it (mlflow experiments restore --experiment-id {found.experiment_id}) "
            "or set mlflow_exp_name to another name"
        )
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


@contextlib.contextmanager
def registry_errors(tracking_uri: str, name: str) -> Iterator[None]:
    """A model registry that cannot be reached or refuses: one line naming it and the model
    (password hidden). Here, below the registry and the model files that both use it."""
    from imgpipe.tracking.outbox import failure_reason, send_failures

    try:
        yield
    except send_failures() as exc:
        raise PipelineError(
            f"model registry at {redact_url(tracking_uri)}: model {name!r}: "
            f"{failure_reason(exc, tracking_uri)}"
        ) from None
