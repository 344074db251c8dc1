"""DVC experiments in temp copies (`dvc exp run --queue` + `dvc queue start -j 2`, `--temp`)
use the project's environment and never change it: each experiment trains in its copy with
its own code, gets its own MLflow run in the project's store and its own dvclive results,
and `dvc exp show` lists them. A copy whose dependencies differ from the environment stops
with one line instead of installing.

The project copy has its own `.venv` as users have it (its own folder and stamp, the tests'
packages through links), so nothing here passes VENV or SETUP: the Makefile's own choice is
under test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import error_lines
from imgpipe.testing import VENV, copy_project

pytestmark = pytest.mark.slow


def own_venv(project: Path) -> Path:
    """`project/.venv`: a virtual environment of its own (pyvenv.cfg, stamp) over the tests'
    packages (lib/ and bin/ linked), set up for the project's pyproject.toml and lock."""
    venv = project / ".venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(VENV / "pyvenv.cfg", venv / "pyvenv.cfg")
    os.symlink(VENV / "lib", venv / "lib")
    for exe in (VENV / "bin").iterdir():
        os.symlink(exe, venv / "bin" / exe.name)
    checksum = subprocess.run(
        "cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1",
        shell=True, cwd=project, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (venv / f".deps-{checksum}").touch()
    return venv


def user_env(venv: Path) -> dict[str, str]:
    """A user's shell with the environment activated (DVC's queue workers start `dvc` from
    PATH), and nothing that would steer the Makefile."""
    env = {k: v for k, v in os.environ.items() if k not in ("VENV", "SETUP", "DVC_ROOT")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return {**env, "RUNTIME": "local", "PATH": f"{venv / 'bin'}:{env['PATH']}"}


def snapshot(venv: Path) -> dict[str, float]:
    """What an install would change: the venv's own files and the package's install record."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    records = [p for p in site.iterdir() if "imgpipe" in p.name.lower()]
    return {str(p): p.stat().st_mtime for p in [*venv.iterdir(), *records]}


@pytest.fixture
def experiment_project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    project = copy_project(tmp_path / "p")
    venv = own_venv(project)
    env = user_env(venv)
    result = subprocess.run(["make", "data"], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return project, env


def dvc(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )


def test_two_queued_experiments_in_parallel_leave_the_environment_as_it_was(
    experiment_project: tuple[Path, dict[str, str]],
) -> None:
    project, env = experiment_project
    venv = project / ".venv"
    before = snapshot(venv)
    for lr in ("1.1", "1.2"):
        queued = dvc(
            project, env, "exp", "run", "--queue", "train", "-S", f"lr={lr}", "-S", "epochs=1"
        )
        assert queued.returncode == 0, queued.stderr
    assert dvc(project, env, "queue", "start", "-j", "2").returncode == 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = dvc(project, env, "queue", "status").stdout
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status

    # The environment: not one file changed, and every `python -m imgpipe` target works.
    assert snapshot(venv) == before
    params = subprocess.run(
        ["make", "params"], cwd=project, env=env, capture_output=True, text=True
    )
    assert params.returncode == 0, params.stderr

    # Each experiment: its own metrics in `dvc exp show`, its own run in the project's store.
    shown = json.loads(dvc(project, env, "exp", "show", "--json").stdout)
    experiments = [
        exp["data"] for rev in shown for exp in rev.get("experiments") or [] for exp in exp["revs"]
    ]
    lrs = sorted(e["params"]["params.yaml"]["data"]["lr"] for e in experiments)
    assert lrs == [1.1, 1.2]
    for e in experiments:
        assert e["metrics"], e  # dvclive's metrics of that experiment
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    runs = [r for x in client.search_experiments() for r in client.search_runs(x.experiment_id)]
    assert sorted(float(r.data.params["lr"]) for r in runs) == [1.1, 1.2]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_copy_whose_dependencies_differ_stops_with_one_line_and_installs_nothing(
    experiment_project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """What a queued experiment with an edited pyproject.toml meets (DVC_ROOT names the
    repository, the stage runs in the copy)."""
    project, env = experiment_project
    venv = project / ".venv"
    before = snapshot(venv)
    copy = tmp_path / "exps" / "copy"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns(".venv", ".dvc"))
    with (copy / "pyproject.toml").open("a") as f:
        f.write("\n# changed in the experiment\n")
    result = subprocess.run(
        ["make", "train"], cwd=copy, env={**env, "DVC_ROOT": str(project)},
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"error: {project}/.venv is not set up for this experiment's pyproject.toml and "
        "requirements.lock (an experiment never installs into it): run `make setup` in "
        f"{project} and run the experiment again"
    ]
    assert snapshot(venv) == before


def test_a_second_dvc_repro_at_once_is_refused_and_the_first_finishes(
    experiment_project: tuple[Path, dict[str, str]],
) -> None:
    """DVC's own lock: the second run names the first (its pid) and ends; the first trains on."""
    project, env = experiment_project
    first = subprocess.Popen(
        ["dvc", "repro", "train"], cwd=project, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lock = project / ".dvc" / "tmp" / "rwlock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and str(first.pid) not in (
        lock.read_text() if lock.exists() else ""
    ):
        time.sleep(0.2)
    second = dvc(project, env, "repro", "train")
    output, _ = first.communicate(timeout=900)
    assert first.returncode == 0, output[-3000:]
    assert second.returncode != 0
    assert "is busy, it is being blocked by" in second.stderr
    assert f"(PID {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert (project / "models" / "model.pt").is_file()
