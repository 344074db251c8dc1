"""The harness the tests and the bench share, as ``click.testing`` is click's.

    from imgpipe.testing import copy_project, make, mlflow_server, run_script, train_config

    with mlflow_server(tmp / "server") as server:       # a real `mlflow server` on loopback
        run_script("train_model.py", f"mlflow_tracking_uri={server.url}", cwd=tmp)
    project = copy_project(tmp / "project")             # the checkout as a fresh git repo
    make("data", project)                               # make/dvc there with this venv
    cfg = train_config(data, tmp / "run", epochs=2)     # every output under tmp/run

It drives the project from its source checkout (``REPO``, the editable install's root)
and the virtual environment running it (``VENV``); nothing in the pipeline imports it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from imgpipe.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


# --------------------------------------------------------------------------- entry points


def entry_point(script: str) -> list[str]:
    """The command line that runs ``src/<script>`` as a user would, with this interpreter."""
    return [sys.executable, "-u", str(REPO / "src" / script)]


def run_script(
    script: str,
    *overrides: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run one of the project's entry points exactly as a user would."""
    return _run([*entry_point(script), *overrides], cwd, {**os.environ, **(env or {})}, timeout)


def _run(
    cmd: list[str], cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# --------------------------------------------------------------------------- a small training run


def run_outputs(root: Path) -> dict[str, str]:
    """The config values that put a training run's checkpoints, dvclive files and logs
    under ``root``."""
    return {
        "model_checkpoint_dir_path": str(root / "models"),
        "live_dir_path": str(root / "dvclive"),
        "log_dir": str(root / "logs"),
    }


def train_config(
    data: Path, root: Path, *, store: Path | None = None, **changes: object
) -> TrainConfig:
    """A training config on the processed ``data`` with every output under ``root``; its
    SQLite store is ``root/store/mlflow.db`` unless ``store`` names one runs share."""
    values = {
        "data_dir_path": str(data),
        "mlflow_tracking_uri": f"sqlite:///{store or root / 'store' / 'mlflow.db'}",
        **run_outputs(root),
    }
    return TrainConfig(**(values | changes))


# --------------------------------------------------------------------------- mlflow server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def mlflow_server(
    root: Path,
    *,
    workers: int | None = 1,
    env: Mapping[str, str] | None = None,
    store: str | None = None,
    artifacts: Path | None = None,
    start_timeout: float = 120,
) -> Iterator[Server]:
    """A real `mlflow server` on a free loopback port, stopped on exit.

    ``root`` holds its log (``server.log``) and, unless ``store`` (a backend store URI) and
    ``artifacts`` say otherwise, its SQLite store and artifacts. ``workers=1`` is how
    `make mlflow-server` starts it, ``None`` leaves MLflow's default; ``env`` is added to
    this process's environment.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = server_command(port, root, workers=workers, store=store, artifacts=artifacts)
    full_env = server_env(env)
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=full_env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, proc, root / "server.log", start_timeout)
            yield Server(url, proc.pid)
        finally:
            stop(proc)


def server_command(
    port: int,
    root: Path,
    *,
    workers: int | None = 1,
    store: str | None = None,
    artifacts: Path | None = None,
) -> list[str]:
    """The `mlflow server` command line on 127.0.0.1:``port``, its store under ``root``."""
    return [
        str(VENV / "bin" / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(["--workers", str(workers)] if workers else []),
        "--backend-store-uri",
        store or f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        str(artifacts or root / "artifacts"),
    ]


def server_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    # As `make mlflow-ui` starts it: no GenAI job runner (8 idle processes on 2 cores).
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until the server ``proc`` started answers ``url``/health; raise with the tail of
    its ``log`` when it exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start: {log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- project copy


def copy_project(dest: Path) -> Path:
    """Copy the project's files (tracked and new, never ignored ones) into a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    # dvc exp run commits internally: the copy needs an identity of its own.
    subprocess.run(["git", "config", "user.name", "imgpipe tests"], cwd=dest, check=True)
    subprocess.run(["git", "config", "user.email", "tests@imgpipe.invalid"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def project_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for make/dvc in a project copy: this interpreter's virtual environment,
    used as it is (SETUP empty), so a copy never reinstalls the package into it; stages run
    locally unless the caller asks for a container runtime."""
    return {**os.environ, "VENV": str(VENV), "SETUP": "", "RUNTIME": "local", **(env or {})}


def make(
    target: str,
    cwd: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """`make TARGET` in a project copy."""
    return _run(["make", "--no-print-directory", target, *args], cwd, project_env(env), timeout)


def dvc(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in a project copy."""
    return _run([str(VENV / "bin" / "dvc"), *args], cwd, project_env(env), timeout)
