"""The MLflow model registry, one room for every action on it: a run's model registered as a
version of a name, the alias ``champion`` moved to a version (the champion it replaces keeps
its version and gains ``previous``), and the sweep's rule for when it moves.

    imgpipe promote --run RUN_ID   # or: make promote RUN=RUN_ID
    imgpipe promote --version 3    # or: make promote VERSION=3
    imgpipe register --run RUN_ID  # a version; no alias moves

The command line is ``imgpipe.commands.tracking``. The name is ``--name``, else ``mlflow_registered_model_name`` of the project's config
(conf/train_model.yaml < the params file named by IMGPIPE_PARAMS_FILE, as for the stages);
the store is ``--tracking-uri``, else the config's ``mlflow_tracking_uri``, else
MLFLOW_TRACKING_URI, else the project's local store. Every action logs one line naming the
run and the version it used. The champion loads with
``mlflow.pyfunc.load_model("models:/<name>@champion")``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.errors import PipelineError
from imgpipe.tracking.store import registry_errors

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"


@dataclass(frozen=True)
class Version:
    """One version of a registered model and the run whose model it holds."""

    name: str
    number: int
    run_id: str


# --------------------------------------------------------------------------- the actions


def register(
    client: Any, name: str, run_id: str, *, model_id: str | None = None, say_existing: bool = False
) -> Version:
    """The version of ``name`` that holds ``run_id``'s model: the one registered before (a
    sweep run again, a promotion by run), else a new one. ``model_id``: the logged model,
    when the caller has just logged it (saves looking it up)."""
    _check_name(name)
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        version = _version_of(min(found, key=lambda v: int(v.version)))
        # Unless asked, the action that follows (a promotion, the sweep's decision) says it.
        log.log(
            logging.INFO if say_existing else logging.DEBUG,
            "model %r version %d already holds run %s",
            name,
            version.number,
            run_id,
        )
        return version
    if model_id is None:
        model_id = _logged_model(client, run_id)
    try:
        client.create_registered_model(name)
    except _mlflow_error() as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    created = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
    )
    version = _version_of(created)
    log.info("registered run %s as model %r version %d", run_id, name, version.number)
    return version


def promote(client: Any, name: str, number: int) -> Version:
    """Move ``champion`` to version ``number`` of ``name``; the champion it replaces gains
    ``previous`` (set first: a failure in between leaves the old champion where it was).
    The version's files are checked first against the digests recorded when it was logged
    (``model_files.verify_version``): a model changed since is never promoted."""
    from imgpipe.tracking.model_files import verify_version

    target = _get_version(client, name, number)
    ready(client, target)
    verify_version(client, client.tracking_uri, name, number)
    current = _champion(client, name)
    if current is not None and current.number == target.number:
        log.info(
            "model %r version %d (run %s) is already the %s",
            name,
            target.number,
            target.run_id,
            CHAMPION,
        )
        return target
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(current.number))
    client.set_registered_model_alias(name, CHAMPION, str(target.number))
    was = (
        f"version {current.number} (run {current.run_id}) is {PREVIOUS}"
        if current is not None
        else "there was none before"
    )
    log.info(
        "model %r: %s is version %d (run %s); %s",
        name,
        CHAMPION,
        target.number,
        target.run_id,
        was,
    )
    return target


def promote_if_better(client: Any, challenger: Version, objective: str, direction: str) -> bool:
    """The sweep's rule: ``champion`` moves to ``challenger`` when no version holds it yet,
    or when the challenger's run beats the champion's run on ``objective`` (the metric both
    runs logged under that name, its last value; ``direction`` minimize or maximize; a tie
    keeps the champion). Returns whether it moved."""
    name = challenger.name
    current = _champion(client, name)
    if current is None or current.number == challenger.number:
        promote(client, name, challenger.number)
        return True
    new = _last_value(client, challenger.run_id, objective)
    old = _last_value(client, current.run_id, objective)
    if new is None or old is None:
        missing = current if old is None else challenger
        log.warning(
            "model %r: version %d (run %s) stays %s: run %s logged no %s to compare on; "
            "to choose by hand: make promote VERSION=%d",
            name,
            current.number,
            current.run_id,
            CHAMPION,
            missing.run_id,
            objective,
            challenger.number,
        )
        return False
    better = new < old if direction == "minimize" else new > old
    if better:
        promote(client, name, challenger.number)
        return True
    log.info(
        "model %r: version %d (run %s, %s %.6g) does not beat %s version %d "
        "(run %s, %s %.6g, %s): %s stays",
        name,
        challenger.number,
        challenger.run_id,
        objective,
        new,
        CHAMPION,
        current.number,
        current.run_id,
        objective,
        old,
        direction,
        CHAMPION,
    )
    return False


# --------------------------------------------------------------------------- callers' entries


def register_trained(tracking_uri: str, name: str, run_id: str, model_id: str | None) -> Version:
    """Training's registration (``mlflow_registered_model_name``), right after the model is
    logged."""
    from mlflow import MlflowClient

    with registry_errors(tracking_uri, name):
        return register(MlflowClient(tracking_uri), name, run_id, model_id=model_id)


def register_sweep_best(
    tracking_uri: str,
    name: str,
    best: dict[str, Any],
    direction: str,
) -> Version | None:
    """The sweep's best trial (``best_params.yaml``'s document) registered under ``name``;
    ``champion`` moves to it when it beats the champion on the sweep's first objective
    (the first of ``best["values"]``, named as the study names its objectives)."""
    from mlflow import MlflowClient

    run_id = best.get("mlflow_run_id")
    if not run_id:
        log.warning(
            "model %r: the best trial %s has no MLflow run (setup_mlflow=false?): "
            "nothing registered",
            name,
            best.get("trial"),
        )
        return None
    objective = next(iter(best["values"]))
    with registry_errors(tracking_uri, name):
        client = MlflowClient(tracking_uri)
        version = register(client, name, run_id)
        promote_if_better(client, version, objective, direction)
    return version


# --------------------------------------------------------------------------- helpers

# How long a promotion waits for a version still being written (its registration pending, or
# its logged model still uploading) before it leaves the aliases where they were.
READY_WAIT_S = 30.0  # IMGPIPE_READY_WAIT_S overrides it


def ready(client: Any, version: Version, wait_s: float | None = None) -> None:
    """Return once ``version`` and the logged model behind it are READY. One that failed, or
    is not ready within ``wait_s`` (an upload cut off by an object store that went down),
    is refused in one line: no alias ever points at a half-written model."""
    if wait_s is None:
        wait_s = float(os.environ.get("IMGPIPE_READY_WAIT_S") or READY_WAIT_S)
    deadline = time.monotonic() + wait_s
    while True:
        mv = client.get_model_version(version.name, str(version.number))
        state, what = str(mv.status).rsplit(".", 1)[-1], "its registration"
        # A 3.x version's source is models:/<logged model id> (model_id is not always filled)
        source = str(mv.source or "")
        model_id = getattr(mv, "model_id", None) or (
            source.removeprefix("models:/") if source.startswith("models:/m-") else None
        )
        if state == "READY" and model_id:
            found = client.get_logged_model(model_id)
            state, what = str(found.status).rsplit(".", 1)[-1], f"its logged model {model_id}"
        if state == "READY":
            return
        if "FAILED" in state or time.monotonic() > deadline:
            raise PipelineError(
                f"model {version.name!r} version {version.number}: {what} is {state}, not "
                f"READY: the aliases stay where they were"
            )
        time.sleep(1.0)


def _check_name(name: str) -> None:
    if not name.strip() or "'" in name:
        raise PipelineError(f"registered model name {name!r}: must be non-empty, without quotes")


def _version_of(mv: Any) -> Version:
    return Version(mv.name, int(mv.version), mv.run_id or "")


def _get_version(client: Any, name: str, number: int) -> Version:
    _get_model(client, name)
    try:
        return _version_of(client.get_model_version(name, str(number)))
    except _mlflow_error() as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    have = f"versions {', '.join(map(str, numbers))}" if numbers else "no versions"
    raise PipelineError(f"model {name!r} has no version {number} ({have})")


def _get_model(client: Any, name: str) -> Any:
    _check_name(name)
    try:
        return client.get_registered_model(name)
    except _mlflow_error() as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
    raise PipelineError(f"no registered model {name!r}")


def _champion(client: Any, name: str) -> Version | None:
    aliases = _get_model(client, name).aliases or {}
    number = aliases.get(CHAMPION)
    return None if number is None else _get_version(client, name, int(number))


def _get_run(client: Any, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except _mlflow_error() as exc:
        if getattr(exc, "error_code", "") not in (
            "RESOURCE_DOES_NOT_EXIST",
            "INVALID_PARAMETER_VALUE",
        ):
            raise
    raise PipelineError(f"no MLflow run {run_id!r}")


def _logged_model(client: Any, run_id: str) -> str:
    """The newest finished model the run logged (3.x "logged models" are not run artifacts)."""
    run = _get_run(client, run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    ready = [m for m in models if str(m.status).endswith("READY")]
    if not ready:
        raise PipelineError(f"MLflow run {run_id} has no logged model to register")
    return max(ready, key=lambda m: m.creation_timestamp or 0).model_id


def _last_value(client: Any, run_id: str, metric: str) -> float | None:
    try:
        return client.get_run(run_id).data.metrics.get(metric)
    except _mlflow_error() as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None


def _mlflow_error() -> type[Exception]:
    from mlflow.exceptions import MlflowException

    return MlflowException


# --------------------------------------------------------------------------- by hand


def run_action(
    action: str,
    tracking_uri: str | None,
    name: str,
    *,
    run_id: str | None = None,
    number: int | None = None,
) -> Version:
    """``imgpipe promote`` / ``imgpipe register``: ``action`` (promote or register) on
    ``name`` in the store ``tracking_uri`` (None: MLFLOW_TRACKING_URI, else the project's
    local store), by ``run_id`` or version ``number``."""
    from mlflow import MlflowClient

    from imgpipe.tracking.store import check_tracking_uri, hide_secret_urls, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    store = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if store is not None and not store.is_file():  # MLflow would create an empty one
        raise PipelineError(f"MLflow store {store} does not exist (mlflow_tracking_uri?)")
    check_tracking_uri(uri)
    hide_secret_urls(uri)
    with registry_errors(uri, name):
        client = MlflowClient(uri)
        if action == "register":
            assert run_id is not None
            return register(client, name, run_id, say_existing=True)
        if number is None:
            assert run_id is not None
            number = register(client, name, run_id).number
        return promote(client, name, number)
