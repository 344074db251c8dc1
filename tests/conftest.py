"""Shared fixtures, and only fixtures: real sample data, a real `mlflow server`, a throw-away
copy of the project, a Docker engine that answers. The helpers tests call are in
tests/helpers.py; the harness shared with the bench is imgpipe.testing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers import IN_CI, answering_docker, write_dataset
from imgpipe import testing
from imgpipe.data import export_sample_digits, process_dataset
from imgpipe.data.processed import write_subset

# The order the modules go out to the workers: with --dist loadfile each module runs whole
# on one worker and the run ends when the busier worker does, so the long modules go first
# and the quick ones fill the gaps at the end (the Makefile turns off xdist's own order,
# most tests first, which sent the one-test end-to-end modules out last, alone). First the
# longest measured (a CI run's --durations summed per module), longest first; then the
# others by how many slow tests they hold, most first; modules of quick tests last.
LONGEST_FIRST = (
    "test_resume.py",
    "test_sweep.py",
    "test_sweep_pruning.py",
    "test_ddp.py",
    "test_bench.py",
    "test_team.py",
    "test_preemption.py",
    "test_experiments.py",
    "test_containers.py",
    "test_team_faults.py",
    "test_finetune.py",
    "test_pipeline.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow: dict[str, int] = {}
    for item in items:
        slow[item.path.name] = slow.get(item.path.name, 0) + bool(item.get_closest_marker("slow"))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # Stable: a module keeps its own order (test_team's last test reads what the others
    # recorded), and xdist sees each module in one piece.
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -slow[item.path.name]))


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


@pytest.fixture(scope="session")
def few_processed(sample_processed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The processed sample cut to 320 train / 64 val / 64 test images spread over each
    split (every class in each): for the tests that prove a path (resume, faults, sweeps, several
    processes) rather than what training reaches; a fifth of the sample's epoch."""
    out = tmp_path_factory.mktemp("few") / "processed"
    return write_subset(sample_processed, out, 320, 64, spread=True)


@pytest.fixture
def small_raw(tmp_path: Path) -> Path:
    """A tiny grayscale 6x6 dataset with three named classes."""
    rng = np.random.default_rng(0)
    labels = ["ant", "bee", "cat"]

    def items(n: int) -> list[tuple[str, np.ndarray]]:
        return [(labels[i % 3], rng.integers(0, 256, (6, 6), dtype=np.uint8)) for i in range(n)]

    return write_dataset(tmp_path / "raw", {"train": items(12), "test": items(6)})


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` process on a free loopback port, with its own SQLite store."""
    with testing.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server.url


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return testing.copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The docker client of an engine that already runs (as .ci/run leaves it); skipped
    without one, a failure under CI=true."""
    found = answering_docker()
    if found:
        return found
    if IN_CI:
        pytest.fail("CI must have a Docker engine (docker info failed): .ci/run starts one")
    pytest.skip("no Docker engine answers")
