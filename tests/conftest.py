"""Shared fixtures: real sample data, a real `mlflow server`, a throw-away copy of the project."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe.data import export_sample_digits, process_dataset

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the virtual environment running the tests
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never inherit a user's tracking server, sweep tag or params layering."""
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_HPTUNING_TAG",
        "IMGPIPE_PARAMS_FILE",
        "DVC_ROOT",
        "DVC_EXP_NAME",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


def run_script(
    script: str, *overrides: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run one of the project's entry points exactly as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-u", str(REPO / "src" / script), *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "raw"
    export_sample_digits(out)
    return out


@pytest.fixture(scope="session")
def sample_processed(sample_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "processed"
    process_dataset(sample_raw, out, num_workers=2)
    return out


def write_dataset(root: Path, splits: dict[str, list[tuple[str, np.ndarray]]]) -> Path:
    """Write ``{split: [(label, pixels), ...]}`` in the raw layout with Pillow."""
    for split, items in splits.items():
        rows = ["filepath,label"]
        for i, (label, pixels) in enumerate(items):
            rel = f"{split}/{label}/{i:05d}.png"
            (root / split / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / rel)
            rows.append(f"{rel},{label}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def small_raw(tmp_path: Path) -> Path:
    """A tiny grayscale 6x6 dataset with three named classes."""
    rng = np.random.default_rng(0)
    labels = ["ant", "bee", "cat"]

    def items(n: int) -> list[tuple[str, np.ndarray]]:
        return [(labels[i % 3], rng.integers(0, 256, (6, 6), dtype=np.uint8)) for i in range(n)]

    return write_dataset(tmp_path / "raw", {"train": items(12), "test": items(6)})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` process on a free loopback port, with its own SQLite store."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(VENV / "bin" / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        # As `make mlflow-ui` starts it: no GenAI job runner (8 idle processes on 2 cores).
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(
                f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
            )
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def copy_project(dest: Path) -> Path:
    """Copy the project's files (tracked and new, never ignored ones) into a fresh git repo."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
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


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


def project_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for make/dvc in a project copy: this interpreter's virtual environment,
    used as it is (SETUP empty), so a copy never reinstalls the package into it; stages run
    locally unless a test asks for a container runtime."""
    return {**os.environ, "VENV": str(VENV), "SETUP": "", "RUNTIME": "local", **(env or {})}


def make(
    target: str, cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`make TARGET` in a project copy."""
    return subprocess.run(
        ["make", "--no-print-directory", target, *args],
        cwd=cwd,
        env=project_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def dvc(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV / "bin" / "dvc"), *args],
        cwd=cwd,
        env=project_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
