"""The MLflow model of a training: what is logged, the digests of its files, and fetching it
back for ``predict`` and ``serve`` only when every file is what was logged.

What is logged is an MLflow pyfunc model whose loader is ``imgpipe.tracking.pyfunc`` (the
``MLmodel`` names a module of this package: no pickled code) and whose data is the
training's ``model.pt``: architecture, classes, input size and mode, normalisation, resize
rule and weights, loaded with ``weights_only``. So ``models:/<name>@champion`` alone
classifies an image file: ``mlflow.pyfunc.load_model(uri).predict(["cat.png"])``.

Integrity: right after logging, the SHA-256 of every file of the model is recorded as the
run's param ``model_sha256.<model id>`` (MLflow refuses to change a param once logged);
promoting a version records the same on the version (tag ``model_sha256``), and for a
model logged before digests existed, records them there first. ``fetch_model`` downloads a
model and compares every file before anything is loaded: a file that differs, is missing
or was added is one line naming it (a user with EDIT rights could otherwise swap the
champion's ``MLmodel`` for one that runs code when loaded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.errors import PipelineError

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model"  # runs:/<run id>/model
LOADER_MODULE = "imgpipe.tracking.pyfunc"
DIGEST_PARAM = "model_sha256."  # + the logged model's id: a run param, JSON {file: sha256}
DIGEST_TAG = "model_sha256"  # on a registered model version, the same JSON
MODEL_DATA = "data/model.pt"  # the model.pt inside the logged model's folder


def file_digests(folder: str | os.PathLike[str]) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by its path relative to it (``/``)."""
    root = Path(folder)
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digests[path.relative_to(root).as_posix()] = h.hexdigest()
    return digests


# --------------------------------------------------------------------------- logging


class _DigestingPyfunc:
    """A pyfunc flavor as ``Model.log`` calls it: writes the model's folder itself (data,
    environment files, ``MLmodel`` through ``mlflow.pyfunc.add_to_model``) and takes the
    digests of what it wrote before the upload, so what is recorded is what was sent.
    Written by hand rather than by ``mlflow.pyfunc.save_model``, whose requirement checks
    scan every installed package (3 s of the training run's end, measured here)."""

    __name__ = "mlflow.pyfunc"

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}

    def save_model(self, path: str, mlflow_model: Any, *, data_path: str, **_: Any) -> None:
        import platform
        import shutil

        import mlflow
        import mlflow.pyfunc
        import torch
        import yaml

        folder = Path(path)
        (folder / "data").mkdir(parents=True)
        shutil.copyfile(data_path, folder / MODEL_DATA)
        # What the loader imports besides this project's package (installed where it runs).
        requirements = [
            f"mlflow=={mlflow.__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            "numpy",
            "pandas",
            "pillow",
        ]
        (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
        python = platform.python_version()
        (folder / "python_env.yaml").write_text(
            yaml.safe_dump(
                {
                    "python": python,
                    "build_dependencies": ["pip"],
                    "dependencies": ["-r requirements.txt"],
                }
            )
        )
        (folder / "conda.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": "mlflow-env",
                    "channels": ["conda-forge"],
                    "dependencies": [f"python={python}", "pip", {"pip": requirements}],
                }
            )
        )
        mlflow.pyfunc.add_to_model(
            mlflow_model,
            loader_module=LOADER_MODULE,
            data=MODEL_DATA,
            conda_env="conda.yaml",
            python_env="python_env.yaml",
        )
        mlflow_model.save(str(folder / "MLmodel"))
        self.digests = file_digests(folder)


def log_model_file(model_file: str | os.PathLike[str]) -> str:
    """Log ``model_file`` (a model.pt) into the active run as the MLflow model and record its
    files' digests as a run param; the logged model's id."""
    import mlflow
    from mlflow.models import Model

    flavor = _DigestingPyfunc()
    info = Model.log(
        artifact_path=None, name=ARTIFACT_NAME, flavor=flavor, data_path=str(model_file)
    )
    mlflow.log_param(DIGEST_PARAM + info.model_id, json.dumps(flavor.digests, sort_keys=True))
    return info.model_id


# --------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class FetchedModel:
    """A model downloaded from MLflow and checked, file by file."""

    uri: str
    model_id: str
    run_id: str
    folder: Path
    name: str | None = None  # the registered model, when fetched through the registry
    version: int | None = None

    @property
    def model_file(self) -> Path:
        return self.folder / MODEL_DATA

    @property
    def label(self) -> str:
        if self.name is not None:
            return f"{self.name} version {self.version}"
        return f"run {self.run_id} model {self.model_id}"


_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_MODELS_ID = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9a-f]+)/(?P<path>[^/]+)/?$")


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/"))


def fetch_model(uri: str, tracking_uri: str, dest: str | os.PathLike[str]) -> FetchedModel:
    """Download the MLflow model ``uri`` into ``dest`` and check every file against the
    digests recorded for it; PipelineError (one line) when one differs or none were."""
    from mlflow import MlflowClient

    from imgpipe.tracking.store import registry_errors

    with registry_errors(tracking_uri, uri):
        client = MlflowClient(tracking_uri)
        model_id, run_id, name, version, tags = _resolve(client, uri)
        expected = recorded_digests(client, run_id, model_id, tags)
        if expected is None:
            raise PipelineError(
                f"{uri}: no file digests were recorded for this model (logged before they "
                "were); promote it once to record them: make promote "
                + (f"VERSION={version}" if version else f"RUN={run_id}")
            )
        folder = Path(dest) / "model"
        folder = _download(client, model_id, tracking_uri, folder)
    check_digests(uri, folder, expected)
    if not (folder / MODEL_DATA).is_file():
        raise PipelineError(f"{uri}: not an image model of this project (no {MODEL_DATA})")
    return FetchedModel(uri, model_id, run_id, folder, name, version)


def _resolve(client: Any, uri: str) -> tuple[str, str, str | None, int | None, Mapping[str, str]]:
    """(model id, run id, registered name, version, version tags) that ``uri`` stands for."""
    from mlflow.exceptions import MlflowException

    try:
        if m := _MODELS_ALIAS.match(uri):
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        elif m := _MODELS_VERSION.match(uri):
            mv = client.get_model_version(m["name"], m["version"])
        elif m := _MODELS_ID.match(uri):
            model = client.get_logged_model(m["id"])
            return model.model_id, model.source_run_id or "", None, None, {}
        elif m := _RUNS.match(uri):
            return (*_run_model(client, m["run"], m["path"], uri), None, None, {})
        else:
            raise PipelineError(
                f"model {uri!r}: expected a model.pt path, models:/<name>@<alias>, "
                "models:/<name>/<version> or runs:/<run id>/model"
            )
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise PipelineError(f"{uri}: not found ({exc.message.splitlines()[0]})") from None
    model_id = version_model_id(mv)
    if not model_id:
        raise PipelineError(f"{uri}: version {mv.version} holds no logged model")
    return model_id, mv.run_id or "", mv.name, int(mv.version), dict(mv.tags or {})


def version_model_id(mv: Any) -> str | None:
    """The logged model a registry version holds (the SQL store leaves ``model_id`` empty
    and names it in ``source``: models:/<model id>)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = mv.source or ""
    return source.removeprefix("models:/") if _MODELS_ID.match(source) else None


def _run_model(client: Any, run_id: str, path: str, uri: str) -> tuple[str, str]:
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' and name = '{path}'",
    )
    ready = [m for m in models if str(m.status).endswith("READY")]
    if not ready:
        raise PipelineError(f"{uri}: run {run_id} has no logged model named {path!r}")
    return max(ready, key=lambda m: m.creation_timestamp or 0).model_id, run_id


def recorded_digests(
    client: Any, run_id: str, model_id: str, version_tags: Mapping[str, str] | None = None
) -> dict[str, str] | None:
    """The digests recorded when the model was logged (the run's param), else when its
    version was promoted (the version's tag); None when neither was."""
    text = None
    if run_id:
        text = client.get_run(run_id).data.params.get(DIGEST_PARAM + model_id)
    if text is None and version_tags:
        text = version_tags.get(DIGEST_TAG)
    if text is None:
        return None
    try:
        digests = json.loads(text)
    except json.JSONDecodeError:
        digests = None
    if not isinstance(digests, dict):
        raise PipelineError(f"model {model_id}: its recorded digests are not readable")
    return digests


def _download(client: Any, model_id: str, tracking_uri: str, folder: Path) -> Path:
    """The logged model's files, from its artifact location (a ``models:/`` download would
    resolve through the global tracking URI and add a file of MLflow's own)."""
    import mlflow

    location = client.get_logged_model(model_id).artifact_location
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=str(folder), tracking_uri=tracking_uri
        )
    )


def check_digests(uri: str, folder: Path, expected: Mapping[str, str]) -> None:
    """One line naming the first file that is not as recorded (changed, missing, added)."""
    actual = file_digests(folder)
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            raise PipelineError(f"{uri}: file {name} is missing from the model: not loaded")
        if name not in expected:
            raise PipelineError(
                f"{uri}: file {name} was added to the model after it was logged: not loaded"
            )
        if actual[name] != expected[name]:
            raise PipelineError(
                f"{uri}: file {name} changed after the model was logged (sha256 "
                f"{actual[name][:12]}..., recorded {expected[name][:12]}...): not loaded"
            )


def verify_version(client: Any, tracking_uri: str, name: str, number: int) -> dict[str, str]:
    """``promote``'s check: version ``number`` of ``name`` downloaded and compared with the
    digests recorded when it was logged; a version logged before digests existed gets its
    current files' digests recorded (with a warning). Returns the digests."""
    mv = client.get_model_version(name, str(number))
    uri = f"models:/{name}/{number}"
    model_id = version_model_id(mv)
    if not model_id:
        raise PipelineError(f"{uri}: holds no logged model")
    expected = recorded_digests(client, mv.run_id or "", model_id, dict(mv.tags or {}))
    with tempfile.TemporaryDirectory(prefix="imgpipe-promote-") as tmp:
        folder = Path(tmp) / "model"
        folder = _download(client, model_id, tracking_uri, folder)
        if expected is None:
            expected = file_digests(folder)
            log.warning("%s was logged without file digests: recording its files' digests now", uri)
        else:
            check_digests(uri, folder, expected)
    if (mv.tags or {}).get(DIGEST_TAG) is None:
        client.set_model_version_tag(name, str(number), DIGEST_TAG, json.dumps(expected))
    return expected
