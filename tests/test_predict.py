"""`imgpipe predict` (the predict stage): the test split gives training's test accuracy
exactly; unreadable files are listed in errors.csv and the rest predicted; nothing readable
is one line and no output; the MLflow model classifies image files alone, and a model whose
files changed after logging is refused by predict, serve and promote."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import error_lines
from imgpipe.testing import REPO, train_config

pytestmark = pytest.mark.slow


def imgpipe(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "imgpipe", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def trained(sample_processed: Path, tmp_path_factory: pytest.TempPathFactory):
    """One epoch on the sample, tracked in a SQLite store: model.pt and its MLflow model."""
    from imgpipe.train import train

    root = tmp_path_factory.mktemp("trained")
    cfg = train_config(sample_processed, root, epochs=1)
    result = train(cfg)
    return {
        "model": Path(cfg.model_checkpoint_dir_path) / "model.pt",
        "accuracy": result.test_accuracy,
        "run_id": result.run_id,
        "store": cfg.mlflow_tracking_uri,
        "root": root,
    }


def predict(tmp_path: Path, folder: Path, model: str, out: Path, **env: str):
    return imgpipe(
        "predict",
        f"predict_input={folder}",
        f"predict_model={model}",
        f"predict_output_dir={out}",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
        env=env,
    )


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_the_test_split_gives_trainings_test_accuracy_exactly(
    trained, sample_raw: Path, tmp_path: Path
) -> None:
    out = tmp_path / "predictions"
    result = predict(tmp_path, sample_raw / "test", str(trained["model"]), out)
    assert result.returncode == 0, result.stderr[-2000:]

    metrics = json.loads((out / "metrics.json").read_text())
    # The same images, pixels and arithmetic: the same hits (training's mean is float32,
    # so equal up to its rounding, far below one image in 359).
    assert metrics["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)
    assert metrics["errors"] == 0 and metrics["predicted"] == metrics["images"] == 359
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}
    assert all(0 <= v["precision"] <= 1 and v["support"] > 0 for v in metrics["per_class"].values())
    predicted = rows(out / "predictions.csv")
    assert len(predicted) == 359
    first = predicted[0]
    assert list(first)[:5] == ["path", "prediction", "probability", "top1", "top1_probability"]
    assert first["prediction"] == first["top1"] and "top3" in first and first["label"]
    assert float(first["probability"]) >= float(first["top2_probability"])
    hits = sum(r["prediction"] == r["label"] for r in predicted)
    assert hits / len(predicted) == metrics["accuracy"]
    assert rows(out / "errors.csv") == []
    assert (out / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
    pairs = json.loads((out / "confusion_matrix.json").read_text())
    assert len(pairs) == 359 and set(pairs[0]) == {"actual", "predicted"}


def test_unreadable_files_are_in_errors_csv_and_the_rest_predicted(
    trained, sample_raw: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "new"
    for label in ("3", "5"):
        (folder / label).mkdir(parents=True)
        for image in sorted((sample_raw / "test" / label).iterdir())[:4]:
            shutil.copy(image, folder / label / image.name)
    (folder / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (folder / "5" / "really-a-text.png").write_text("not an image at all\n")
    outside = next((sample_raw / "train" / "7").iterdir())
    (folder / "5" / "link.png").symlink_to(outside)
    (folder / "notes.txt").write_text("ignored: not an image extension\n")

    out = tmp_path / "predictions"
    result = predict(tmp_path, folder, str(trained["model"]), out)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = {Path(r["path"]).name: r["error"] for r in rows(out / "errors.csv")}
    assert set(errors) == {"corrupt.png", "really-a-text.png", "link.png"}
    assert "leads outside" in errors["link.png"]
    assert "cannot decode" in errors["corrupt.png"]
    predicted = rows(out / "predictions.csv")
    assert len(predicted) == 8 and {r["label"] for r in predicted} == {"3", "5"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["images"], metrics["predicted"], metrics["errors"]) == (11, 8, 3)
    # Each one is named in the log too, and the run says what it did.
    assert "3 not readable" in result.stderr


def test_a_folder_with_no_readable_image_stops_with_one_line_and_writes_nothing(
    trained, tmp_path: Path
) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(os.urandom(100))
    out = tmp_path / "predictions"
    result = predict(tmp_path, folder, str(trained["model"]), out)
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "could be read" in line and str(folder) in line
    assert "Traceback" not in result.stderr and not out.exists()


def test_images_without_labels_are_predicted_without_accuracy(
    trained, sample_raw: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "flat"
    folder.mkdir()
    for image in sorted((sample_raw / "test" / "0").iterdir())[:5]:
        shutil.copy(image, folder / image.name)
    out = tmp_path / "predictions"
    result = predict(tmp_path, folder, str(trained["model"]), out)
    assert result.returncode == 0, result.stderr[-2000:]
    predicted = rows(out / "predictions.csv")
    assert len(predicted) == 5 and "label" not in predicted[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "accuracy" not in metrics and metrics["predicted"] == 5
    assert not (out / "confusion_matrix.json").exists()


def test_the_mlflow_model_classifies_files_and_a_changed_file_is_refused(
    trained, sample_raw: Path, tmp_path: Path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from imgpipe.errors import PipelineError
    from imgpipe.tracking import registry

    uri = f"runs:/{trained['run_id']}/model"
    env = {"MLFLOW_TRACKING_URI": trained["store"]}
    # The logged model alone classifies an image file: its preprocessing travels with it.
    mlflow.set_tracking_uri(trained["store"])
    files = sorted(str(p) for p in (sample_raw / "test" / "4").iterdir())[:3]
    answers = mlflow.pyfunc.load_model(uri).predict(files)
    assert list(answers.columns) == ["prediction", "probability", "top_k"] and len(answers) == 3

    # predict from MLflow gives what model.pt gives.
    out = tmp_path / "from-mlflow"
    result = predict(tmp_path, sample_raw / "test", uri, out, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = json.loads((out / "metrics.json").read_text())["accuracy"]
    assert accuracy == pytest.approx(trained["accuracy"], abs=1e-6)
    client = MlflowClient(trained["store"])
    version = registry.register(client, "digits-cnn", trained["run_id"])

    # Someone with EDIT rights rewrites the logged MLmodel in the store.
    (mlmodel,) = [p for p in (trained["root"] / "store").rglob("MLmodel") if "artifacts" in p.parts]
    mlmodel.write_text(mlmodel.read_text() + "\n# changed\n")

    refused = predict(tmp_path, sample_raw / "test", uri, tmp_path / "again", **env)
    assert refused.returncode == 2
    (line,) = error_lines(refused.stderr)
    assert "MLmodel changed after the model was logged" in line and uri in line
    assert not (tmp_path / "again").exists()

    served = imgpipe(
        "serve", f"serve_model={uri}", "serve_port=1", f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert served.returncode == 2
    assert "MLmodel changed after the model was logged" in error_lines(served.stderr)[0]

    with pytest.raises(PipelineError, match="MLmodel changed after the model was logged"):
        registry.promote(client, "digits-cnn", version.number)
    assert "champion" not in (client.get_registered_model("digits-cnn").aliases or {})


def _served_store(trained, root: Path) -> tuple[str, str]:
    """A copy of the trained run's store (SQLite + artifacts) for a server of its own, with
    the run's model registered as ``digits-faults`` and made champion; (backend, artifacts)."""
    from mlflow import MlflowClient

    from imgpipe.tracking import registry

    shutil.copytree(trained["root"] / "store", root / "store")
    backend = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    client = MlflowClient(backend)
    version = registry.register(client, "digits-faults", trained["run_id"])
    client.set_registered_model_alias("digits-faults", "champion", version.number)
    return backend, str(root / "store" / "artifacts")


def _refused_with_one_line(result, server_url: str, password: str) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = error_lines(result.stderr)
    assert server_url.removeprefix("http://") in line, line
    assert password not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return line


@pytest.mark.parametrize("fault", ["server-killed", "server-failing"])
def test_a_tracking_server_down_or_failing_is_one_line_and_no_output(
    trained, sample_raw: Path, tmp_path: Path, fault: str
) -> None:
    """predict and serve given the champion while its tracking server is gone (killed:
    connection refused) or failing (its store broken under it: HTTP 5xx): one line naming
    the server without the password, exit 2, the earlier predictions/ untouched, and the
    server never ready. `make serve` with no MODEL (the champion by default) is no
    exception: it does not fall back to another model."""
    from imgpipe.testing import free_port, mlflow_server

    backend, artifacts = _served_store(trained, tmp_path)
    out = tmp_path / "predictions"
    out.mkdir()
    (out / "predictions.csv").write_text("path,prediction\nearlier.png,7\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    password = "never-shown-pw"
    champion = "models:/digits-faults@champion"
    params = tmp_path / "params.yaml"
    params.write_text("mlflow_registered_model_name: digits-faults\n")
    port = free_port()

    def attempts(env: dict[str, str]) -> list:
        """predict, serve of the champion, serve with no model (the champion by default)."""
        logs = f"log_dir={tmp_path / 'logs'}"
        serve = ("serve", f"serve_port={port}", logs)
        return [
            predict(tmp_path, sample_raw / "test", champion, out, **env),
            imgpipe(*serve, f"serve_model={champion}", cwd=tmp_path, env=env, timeout=120),
            imgpipe(*serve, cwd=tmp_path, env=env | {"IMGPIPE_PARAMS_FILE": str(params)},
                    timeout=120),
        ]  # fmt: skip

    with mlflow_server(tmp_path / "server", store=backend, artifacts=Path(artifacts)) as server:
        env = {
            "MLFLOW_TRACKING_URI": server.url.replace("http://", f"http://alice:{password}@"),
            # One try: MLflow's client would otherwise retry a 5xx with backoff for minutes.
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        }
        if fault == "server-failing":
            db = tmp_path / "store" / "mlflow.db"
            db.write_bytes(b"\0" * db.stat().st_size)  # the server's store breaks under it
            results = attempts(env)
    if fault == "server-killed":  # the server is stopped now: connection refused
        results = attempts(env)
    lines = [_refused_with_one_line(r, server.url, password) for r in results]
    if fault == "server-killed":
        assert all("unreachable" in line for line in lines), lines
    else:
        assert all("digits-faults" in line for line in lines), lines
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not any("serving" in r.stderr for r in results[1:])


def test_the_stage_is_declared_after_train() -> None:
    import yaml

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["predict"]
    assert stage["cmd"] == "make predict"
    assert "${predict_model}" in stage["deps"] and "${predict_input}" in stage["deps"]
    assert stage["outs"] == ["${predict_output_dir}"]
