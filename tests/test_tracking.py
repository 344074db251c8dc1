"""Tracking against a real `mlflow server` process; URL handling and redaction."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import error_lines
from imgpipe.testing import free_port, run_script
from imgpipe.tracking import Tracker, redact_url, resolve_tracking_uri


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////abs/mlruns/mlflow.db", "sqlite:////abs/mlruns/mlflow.db"),
        ("https://alice:s3cret@mlflow.example.com/", "https://alice:***@mlflow.example.com/"),
        ("postgresql://bob:pa%40ss@db:5432/optuna", "postgresql://bob:***@db:5432/optuna"),
        ("postgresql://db/x?user=u&password=s3cret", "postgresql://db/x?user=u&password=***"),
    ],
)
def test_redact_url_hides_passwords_only(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", "/repo")  # dvc exp run --temp: the store stays in the real repo
    assert resolve_tracking_uri(None) == "sqlite:////repo/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://other:1") == "http://other:1"


@pytest.mark.server
def test_training_against_a_real_mlflow_server(
    mlflow_server: str, sample_processed: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    result = run_script(
        "train_model.py",
        f"mlflow_tracking_uri={mlflow_server}",
        "lr=1.5",
        "epochs=2",
        "mlflow_exp_name=server-test",
        f"data_dir_path={sample_processed}",
        f"model_checkpoint_dir_path={tmp_path / 'models'}",
        f"live_dir_path={tmp_path / 'dvclive'}",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
        env={"MLFLOW_HPTUNING_TAG": "42"},
    )
    assert result.returncode == 0, result.stderr
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
    assert run.data.params["lr"] == "1.5"
    assert run.data.tags["hptuning_tag"] == "42"
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy")] == [2]
    assert not (tmp_path / "mlruns").exists()  # nothing written to the local store


def test_unreachable_server_stops_before_training_and_hides_the_password(
    sample_processed: Path, tmp_path: Path
) -> None:
    url = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    result = run_script(
        "train_model.py",
        f"mlflow_tracking_uri={url}",
        f"data_dir_path={sample_processed}",
        f"model_checkpoint_dir_path={tmp_path / 'models'}",
        f"live_dir_path={tmp_path / 'dvclive'}",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "unreachable" in line and "http://alice:***@127.0.0.1" in line
    assert "s3cret" not in result.stderr + result.stdout
    assert "s3cret" not in "".join(p.read_text() for p in (tmp_path / "logs").glob("*"))
    assert not (tmp_path / "models").exists() and not (tmp_path / "dvclive").exists()


def test_tracking_time_counts_nested_calls_once(tmp_path: Path) -> None:
    """The cost a run reports ("done in ... (tracking: ...)") is never more than the time
    its tracking calls took: log_epoch opens dvclive inside, which must not count twice."""
    tracker = Tracker(tmp_path / "dvclive")
    start = time.perf_counter()
    with tracker:
        spent = time.perf_counter() - start  # entering starts dvclive's loading: counted
        for epoch in (1, 2):
            start = time.perf_counter()
            tracker.log_epoch(epoch, {"train/loss": 1.0 / epoch})
            spent += time.perf_counter() - start
        assert 0 < tracker.blocking_s <= spent
    assert (tmp_path / "dvclive" / "metrics.json").exists()
    assert tracker.background_cpu_s == 0
