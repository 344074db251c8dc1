"""A tracking server that goes away never stops training, and nothing is lost or doubled.

Each test runs its own real `mlflow server` on a fixed port and SQLite store, so killing it
and starting it again is "the same server restarted". Client retries are off
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``): only the project's own outbox stands between an
outage and the run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from imgpipe import checkpoint
from imgpipe.testing import (
    VENV,
    entry_point,
    free_port,
    run_outputs,
    server_command,
    server_env,
    train_config,
    wait_until_healthy,
)
from imgpipe.train import METRIC_NAMES, train

EPOCHS = 3
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


class Server:
    """A real `mlflow server` that can be killed (all its processes) and started again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd, env = server_command(self.port, self.root), server_env()
        with open(self.root / "server.log", "a") as log:
            # Its own session: the uvicorn worker it spawns dies with it on killpg.
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_until_healthy(self.url, self.proc, self.root / "server.log")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tmp_path: Path):
    srv = Server(tmp_path / "server")
    srv.start()
    yield srv
    srv.kill()


def history(url: str, run_id: str) -> dict[str, list[tuple[int, float, int]]]:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    return {
        name: sorted(
            (m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, name)
        )
        for name in METRIC_NAMES
    }


def checkpoint_values(models: Path) -> dict[str, list[tuple[int, float]]]:
    state, _ = checkpoint.load_latest(models)
    return {
        name: [(e["epoch"], e["metrics"][name]) for e in state.history] for name in METRIC_NAMES
    }


def ready_models(url: str, run_id: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return sum(str(m.status).endswith("READY") for m in found)


RUN_OPEN = "MLflow run "  # the run starter's line once the run exists (training goes on meanwhile)


class OnEpochLine(logging.Handler):
    """Runs ``actions[n]`` on the training thread when training logs epoch n's line, once
    the MLflow run exists (an outage while it is made is another story: it fails training)."""

    def __init__(self, actions: dict[int, object]) -> None:
        super().__init__()
        self.actions = actions
        self.run_open = threading.Event()

    def handle(self, record: logging.LogRecord) -> bool:
        # Not under the handler's lock (as Handler.handle would): the run starter's line
        # comes through this handler from another thread while an action may be waiting.
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(RUN_OPEN):
            self.run_open.set()
        for epoch, action in self.actions.items():
            if record.getMessage().startswith(f"epoch {epoch}/"):
                assert self.run_open.wait(120), "the MLflow run was never made"
                action()


@pytest.mark.slow
@pytest.mark.server
def test_server_restarted_mid_training_gets_every_epoch_once(
    server: Server,
    few_processed: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Killed after epoch 1, back after epoch 2 (training waits for its restart, standing in
    for slow epochs): the run holds each epoch once, with the values training computed."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    hook = OnEpochLine({1: server.kill, 2: server.start})
    loggers = [logging.getLogger(n) for n in ("imgpipe.train", "imgpipe.tracking.mlflow_run")]
    for logger in loggers:
        logger.addHandler(hook)
    try:
        cfg = train_config(
            few_processed,
            tmp_path / "run",
            epochs=EPOCHS,
            mlflow_tracking_uri=server.url,
            mlflow_exp_name="restart",
        )
        result = train(cfg)
    finally:
        for logger in loggers:
            logger.removeHandler(hook)

    assert result.test_accuracy > 0
    got = history(server.url, result.run_id)
    expected = checkpoint_values(tmp_path / "run" / "models")
    assert {n: [(s, v) for s, v, _ in points] for n, points in got.items()} == expected
    assert [e for e, _ in expected["val/loss"]] == list(range(1, EPOCHS + 1))
    live = (tmp_path / "run" / "dvclive" / "plots" / "metrics" / "val" / "loss.tsv").read_text()
    assert len(live.splitlines()) == EPOCHS + 1  # header + one row per epoch
    assert MlflowClient(server.url).get_run(result.run_id).info.status == "FINISHED"
    assert ready_models(server.url, result.run_id) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("is lost" in w for w in warnings) == 1, warnings
    assert sum("is back" in w for w in warnings) == 1, warnings
    assert not any("incomplete" in w for w in warnings), warnings


@pytest.mark.slow
@pytest.mark.server
def test_server_gone_for_good_then_sync_completes_the_run_exactly(
    server: Server, few_processed: Path, tmp_path: Path
) -> None:
    """Training exits 0 with its outputs complete and one line naming the command; after
    the server is back, that command completes the run, and a second time changes nothing."""
    from mlflow import MlflowClient

    url = server.url.replace("http://", "http://alice:s3cret@")  # the password never shows
    outputs = run_outputs(tmp_path / "run")
    cmd = [
        *entry_point("train_model.py"),
        f"epochs={EPOCHS}",
        f"data_dir_path={few_processed}",
        f"mlflow_tracking_uri={url}",
        "mlflow_exp_name=gone",
        "mlflow_outage_wait_s=2",
        "mlflow_registered_model_name=gone-cnn",  # registered by the sync, as training would
        *(f"{k}={v}" for k, v in outputs.items()),
    ]
    env = {**os.environ, **NO_RETRIES}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []

    def read() -> None:  # the server goes after epoch 1, once the run exists
        for line in proc.stdout:
            lines.append(line)
            seen = "".join(lines)
            if "epoch 1/" in seen and RUN_OPEN in seen:
                server.kill()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.wait(240) == 0, "".join(lines)
    reader.join(10)
    out = "".join(lines)
    assert "s3cret" not in out and "Traceback" not in out, out
    (line,) = [x for x in lines if "is incomplete" in x]
    models = tmp_path / "run" / "models"
    assert f"imgpipe sync {models}" in line
    assert "MLFLOW_TRACKING_URI" in line  # the URL has a password: the user supplies it
    state, _ = checkpoint.load_latest(models)
    assert state.epoch == EPOCHS and (models / "model.pt").is_file()
    live = (tmp_path / "run" / "dvclive" / "plots" / "metrics" / "val" / "loss.tsv").read_text()
    assert len(live.splitlines()) == EPOCHS + 1

    server.start()
    run_id = state.run_id
    sync = [str(VENV / "bin" / "imgpipe"), "sync", str(models)]
    # The password travels in the environment, as the printed line says.
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    first = subprocess.run(sync, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "s3cret" not in first.stdout + first.stderr
    got = history(server.url, run_id)
    expected = checkpoint_values(models)
    assert {n: [(s, v) for s, v, _ in points] for n, points in got.items()} == expected
    # test/* was measured once, after the last epoch: the sync sends it once, at that step.
    tested = MlflowClient(server.url).get_metric_history(run_id, "test/loss")
    assert [(m.step, m.value) for m in tested] == [
        (EPOCHS, state.history[-1]["metrics"]["test/loss"])
    ]
    assert MlflowClient(server.url).get_run(run_id).info.status == "FINISHED"
    assert ready_models(server.url, run_id) == 1
    assert "registered as model 'gone-cnn' version 1" in first.stdout
    assert registered_runs(server.url, "gone-cnn") == [run_id]

    again = subprocess.run(sync, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "nothing logged" in again.stdout
    assert history(server.url, run_id) == got
    assert ready_models(server.url, run_id) == 1
    assert registered_runs(server.url, "gone-cnn") == [run_id]


def registered_runs(url: str, name: str) -> list[str]:
    """The runs of the registered model's versions, in version order."""
    from mlflow import MlflowClient

    versions = MlflowClient(url).search_model_versions(f"name = '{name}'")
    return [v.run_id for v in sorted(versions, key=lambda v: int(v.version))]


def test_sync_without_a_checkpoint_stops_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    result = subprocess.run(
        [str(VENV / "bin" / "imgpipe"), "sync", str(tmp_path / "models")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'models'}: no checkpoint to sync from"
