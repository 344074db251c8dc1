"""Shared fixtures: real sample data, a real `mlflow server`, a throw-away copy of the project
(the last two are thin wrappers over imgpipe.testing, the harness the bench uses too)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe import testing
from imgpipe.data import export_sample_digits, process_dataset
from imgpipe.testing import (
    REPO,
    VENV,
    copy_project,
    dvc,
    free_port,
    make,
    project_env,
    run_script,
)

# The test modules import the harness's helpers from here, beside the fixtures.
__all__ = [
    "REPO",
    "VENV",
    "copy_project",
    "dvc",
    "free_port",
    "make",
    "project_env",
    "run_script",
]

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


def carve_val_rows(rows: list[str], fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """A train.csv's ``filepath,label`` rows split into (train, val) as process_data carves
    val, recomputed here from the paths alone (imgpipe.data.val_split's rule): per class,
    the rows whose sha256("imgpipe-val:" + filepath) is smallest, round-half-up(n * fraction)
    of them, at least 1 and at most n - 1. Both keep the listing order."""
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row.split(",")[1], []).append(row)
    to_val: set[str] = set()
    for members in by_label.values():
        n = len(members)
        k = 0 if n < 2 else min(n - 1, max(1, int(n * fraction + 0.5)))
        key = lambda row: hashlib.sha256(f"imgpipe-val:{row.split(',')[0]}".encode()).hexdigest()  # noqa: E731
        to_val.update(sorted(members, key=key)[:k])
    return [r for r in rows if r not in to_val], [r for r in rows if r in to_val]


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
    return copy_project(tmp_path / "project")
