"""SIGTERM to `make train NPROC=2`, as a scheduler sends it (to make alone): every rank stops
at a batch boundary, nothing is left running, the checkpoint stays, and `make train NPROC=2`
again resumes into the same MLflow run and ends with the model of a run never stopped."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import assert_same_weights
from imgpipe import checkpoint
from imgpipe.testing import copy_project, make, project_env

pytestmark = pytest.mark.slow

EPOCHS = 6
# Small batches: epochs of a few seconds, so the stop lands inside the training.
VALUES = {"epochs": EPOCHS, "train_bs": 8, "resume": "true"}


def prepared(root: Path) -> Path:
    """A project copy with the sample data processed and the values above in params.yaml."""
    project = copy_project(root)
    assert make("data", project).returncode == 0
    assert make("process-data", project).returncode == 0
    params = project / "params.yaml"
    text = params.read_text()
    for key, value in VALUES.items():
        text, count = re.subn(rf"(?m)^{key}: .*$", f"{key}: {value}", text)
        assert count == 1, key
    params.write_text(text)
    return project


def run_id_and_status(project: Path) -> tuple[str, str]:
    from mlflow import MlflowClient

    run_id = checkpoint.load(project / "models" / checkpoint.CHECKPOINT_FILE)["mlflow_run_id"]
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return run_id, MlflowClient(uri).get_run(run_id).info.status


def test_sigterm_to_make_train_nproc_2_stops_every_rank_and_resume_ends_equal(
    tmp_path: Path,
) -> None:
    straight = prepared(tmp_path / "straight")
    done = make("train", straight, "NPROC=2", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    project = prepared(tmp_path / "stopped")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "train", "NPROC=2"],
        cwd=project, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any(f"epoch 1/{EPOCHS} " in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    # torchrun starts each rank in a session of its own: the tree, not the session, is what
    # must end.
    tree = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in tree if p.environ().get("RANK") in ("0", "1")]
    assert len(ranks) == 2, [p.cmdline() for p in tree]
    proc.send_signal(signal.SIGTERM)  # make alone
    proc.wait(60)
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    reader.join(10)
    output = "".join(lines)
    assert "Traceback" not in output, output[-3000:]
    run_id, status = run_id_and_status(project)
    assert status == "KILLED", output[-3000:]
    stopped_at = checkpoint.load(project / "models" / checkpoint.CHECKPOINT_FILE)["epoch"]
    assert 1 <= stopped_at < EPOCHS, output[-3000:]

    again = make("train", project, "NPROC=2", timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming after epoch {stopped_at}" in again.stdout + again.stderr
    assert run_id_and_status(project) == (run_id, "FINISHED")  # the same run, continued
    assert_same_weights(
        project / "models" / checkpoint.MODEL_FILE, straight / "models" / checkpoint.MODEL_FILE
    )
    metrics = json.loads((project / "dvclive" / "metrics.json").read_text())
    assert metrics == json.loads((straight / "dvclive" / "metrics.json").read_text())
