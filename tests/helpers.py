"""Helpers the test modules share, written once: what a test checks (error lines, weights,
folder digests), the datasets it writes, and whether a Docker engine answers.

The harness the tests share with the bench (servers, project copies, entry points, make and
dvc) is ``imgpipe.testing``; conftest.py holds fixtures only. Import from here as
``from helpers import error_lines`` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgpipe import checkpoint
from imgpipe.config import TrainConfig

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def error_lines(stderr: str) -> list[str]:
    """The one-line errors a run printed (PipelineError's ``error: ...`` form)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path, with the SHA-256 of its content: equal
    digests mean a folder was left exactly as it was."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def model_weights(trained: TrainConfig | Path) -> dict[str, torch.Tensor]:
    """The weights in a training's model file: given the training's config, or the file."""
    if isinstance(trained, TrainConfig):
        trained = Path(trained.model_checkpoint_dir_path) / checkpoint.MODEL_FILE
    return checkpoint.load(trained)["state_dict"]


def assert_same_weights(a: TrainConfig | Path, b: TrainConfig | Path) -> None:
    """Both trainings ended with the same model, bit for bit."""
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


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


def answering_docker() -> str | None:
    """The first docker client whose engine answers (`$DOCKER`, then `docker` on PATH, then
    Debian's /usr/bin/docker), or None."""
    for client in dict.fromkeys((os.environ.get("DOCKER", "docker"), "docker", "/usr/bin/docker")):
        found = shutil.which(client)
        if found and subprocess.run([found, "info"], capture_output=True).returncode == 0:
            return found
    return None


def start_sweep(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    """``train_model.py --multirun ...`` in a session of its own (so a test can SIGKILL the
    whole group), its console lines readable from ``.stderr`` as they come."""
    from imgpipe.testing import REPO

    return subprocess.Popen(
        [sys.executable, "-u", str(REPO / "src" / "train_model.py"), *args],
        cwd=cwd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
