"""Full disks and other failed writes, and one live training per checkpoint folder.

A failed write is one ``error: cannot write <output>: <reason>`` line and exit 2, with
the previous output in place and no temp file left. The disks are real: a small tmpfs
mounted for the test (root only; under CI the tests must run, elsewhere they skip).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers import IN_CI, error_lines
from imgpipe import checkpoint, runlock
from imgpipe.data.processed import load_processed
from imgpipe.errors import PipelineError
from imgpipe.testing import entry_point, run_outputs, run_script

NO_SPACE = os.strerror(28)  # "No space left on device"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a real filesystem of the size asked for (tmpfs), unmounted afterwards
    whatever the test did."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        disk = tmp_path / f"disk-{len(mounted)}"
        disk.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            reason = f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}"
            if IN_CI:
                pytest.fail(reason)
            pytest.skip(reason)
        mounted.append(disk)
        return disk

    try:
        yield mount
    finally:
        for disk in mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes (a whole disk first, then give some back)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: closing has nothing to flush
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    assert os.statvfs(disk).f_bfree * os.statvfs(disk).f_frsize <= leave + 65536


def leftovers(folder: Path) -> list[str]:
    """Temp files or folders and moved-aside old outputs a failed write left behind."""
    return sorted(p.name for p in folder.rglob(".*"))


def test_processing_on_a_full_disk_keeps_the_previous_output(
    sample_raw: Path, small_disk: Callable[[str], Path], tmp_path: Path
) -> None:
    disk = small_disk("2m")  # the sample's processed output is about 140 kB
    out = disk / "processed"
    args = (f"raw_data_dir_path={sample_raw}", f"log_dir={tmp_path / 'logs'}", "num_workers=2")
    first = run_script("process_data.py", *args, f"processed_data_dir_path={out}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = load_processed(out)
    fill(disk, leave=48 * 1024)  # less than one output: the decode workers run out

    result = run_script("process_data.py", *args, f"processed_data_dir_path={out}", cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [f"error: cannot write {out}: {NO_SPACE}"]
    assert "Traceback" not in result.stderr
    after = load_processed(out)
    assert np.array_equal(after.train.images, before.train.images)
    assert np.array_equal(after.test.labels, before.test.labels)
    assert leftovers(disk) == []


@pytest.mark.slow
def test_checkpointing_on_a_full_disk_keeps_the_previous_checkpoint(
    sample_processed: Path, small_disk: Callable[[str], Path], tmp_path: Path
) -> None:
    disk = small_disk("8m")  # two checkpoints and model.pt take about 4.5 MB
    models = disk / "models"
    args = (
        f"data_dir_path={sample_processed}",
        *(f"{k}={v}" for k, v in run_outputs(tmp_path).items()),
        f"model_checkpoint_dir_path={models}",
        "setup_mlflow=false",
    )
    first = run_script("train_model.py", *args, "epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    fill(disk, leave=0)

    result = run_script("train_model.py", *args, "epochs=2", "resume=true", cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    target = models / checkpoint.CHECKPOINT_FILE
    assert error_lines(result.stderr) == [f"error: cannot write {target}: {NO_SPACE}"]
    assert "Traceback" not in result.stderr
    found = checkpoint.load_latest(models)
    assert found is not None
    state, path = found
    assert (state.epoch, path) == (1, target)
    assert leftovers(disk) == []


def test_a_log_folder_that_cannot_be_made_stops_with_one_line(
    sample_raw: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log folder's parent should be")
    logs = blocker / "logs"
    result = run_script(
        "process_data.py",
        f"raw_data_dir_path={sample_raw}",
        f"processed_data_dir_path={tmp_path / 'processed'}",
        f"log_dir={logs}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [f"error: cannot write {logs}: {os.strerror(20)}"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "processed").exists()


# --------------------------------------------------------------------------- the lock


def start_training(processed: Path, root: Path, *extra: str) -> subprocess.Popen:
    """A training in the background; its messages go to ``root/first.err``."""
    overrides = [f"{k}={v}" for k, v in run_outputs(root).items()]
    with open(root / "first.err", "w") as err:  # the child keeps its own copy
        return subprocess.Popen(
            [*entry_point("train_model.py"), f"data_dir_path={processed}", *overrides, *extra],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def holds_lock(models: Path, pid: int) -> bool:
    lock = models / runlock.LOCK_FILE
    return lock.is_file() and f"pid {pid}" in lock.read_text()


@pytest.mark.slow
def test_a_second_training_on_a_held_folder_stops_naming_the_holder(
    sample_processed: Path, tmp_path: Path
) -> None:
    first = start_training(sample_processed, tmp_path, "epochs=2", "setup_mlflow=false")
    models = tmp_path / "models"
    try:
        wait_for(lambda: holds_lock(models, first.pid), first, "lock")
        # Paused, the first run holds the folder however fast this machine trains.
        first.send_signal(signal.SIGSTOP)
        second_root = tmp_path / "second"
        second = run_script(
            "train_model.py",
            f"data_dir_path={sample_processed}",
            *(f"{k}={v}" for k, v in run_outputs(second_root).items()),
            f"model_checkpoint_dir_path={models}",
            "setup_mlflow=false",
            "resume=true",
            cwd=tmp_path,
        )
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        holder = f"host {socket.gethostname()} pid {first.pid}"
        assert error_lines(second.stderr) == [
            f"error: {models} is in use by another training ({holder}); "
            "wait for it to end or stop it"
        ]
        assert not (second_root / "dvclive").exists()  # stopped before touching anything
        assert first.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()
    finally:
        first.kill()
        first.wait()
    found = checkpoint.load_latest(models)
    assert found is not None and found[0].epoch == 2
    assert not (models / runlock.LOCK_FILE).exists()  # released


@pytest.mark.slow
def test_a_lock_left_by_a_killed_training_does_not_block_the_next(
    sample_processed: Path, tmp_path: Path
) -> None:
    first = start_training(sample_processed, tmp_path, "epochs=3", "setup_mlflow=false")
    models = tmp_path / "models"
    try:
        wait_for(lambda: (models / checkpoint.CHECKPOINT_FILE).is_file(), first, "checkpoint")
        first.send_signal(signal.SIGSTOP)  # mid-run, whatever the machine's speed
        assert holds_lock(models, first.pid)
        first.kill()
    finally:
        first.kill()
        first.wait()

    result = run_script(
        "train_model.py",
        f"data_dir_path={sample_processed}",
        *(f"{k}={v}" for k, v in run_outputs(tmp_path).items()),
        "epochs=3",
        "setup_mlflow=false",
        "resume=true",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert "resuming after epoch" in result.stderr
    found = checkpoint.load_latest(models)
    assert found is not None
    assert [entry["epoch"] for entry in found[0].history] == [1, 2, 3]


def test_the_lock_is_refused_while_held_and_free_after(tmp_path: Path) -> None:
    # A second holder inside the same process is refused too (flock is per open file).
    refused = pytest.raises(PipelineError, match=f"pid {os.getpid()}")
    with runlock.lock(tmp_path), refused, runlock.lock(tmp_path):
        pass
    with runlock.lock(tmp_path):
        pass


# --------------------------------------------------------------------------- checkpoints
# written while the MLflow run is being made (resume.Checkpoints), on a full disk


def small_state(epoch: int, run_key: str):
    import torch

    from imgpipe.checkpoint import TrainingState

    return TrainingState(
        epoch=epoch, global_step=4 * epoch, fingerprint="f", config={},
        model=torch.nn.Linear(3, 2).state_dict(), optimizer={}, scheduler={}, rng={},
        run_key=run_key,
    )  # fmt: skip


def busy_tracker(tmp_path: Path, run_key: str):
    """A Tracker whose MLflow run cannot be made until the returned connection lets go of
    the store (another process holding its write lock)."""
    import sqlite3

    from imgpipe.testing import empty_store
    from imgpipe.tracking import RunSpec, Tracker

    store = empty_store(tmp_path / "store" / "mlflow.db")
    spec = RunSpec(
        tracking_uri=f"sqlite:///{store}", experiment_name="e", run_name="r", run_key=run_key
    )
    busy = sqlite3.connect(store)
    busy.execute("BEGIN EXCLUSIVE")
    return Tracker(tmp_path / "dvclive", spec, images=False), busy


def test_a_fresh_training_whose_first_checkpoint_meets_a_full_disk_keeps_the_older_ones(
    small_disk: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The older checkpoints are set aside while the run is being made; the fresh
    training's first write then fails. The run comes to exist, but with nothing of this
    training on disk the older files come back, as a failed first write always left them."""
    from imgpipe import resume

    models = small_disk("4m") / "models"
    small_state(1, "older").save(models, keep_previous=False)
    small_state(2, "older").save(models, keep_previous=True)
    before = {p.name: p.read_bytes() for p in sorted(models.iterdir())}
    fill(models.parent, leave=0)
    tracker, busy = busy_tracker(tmp_path, "new")
    saved = resume.Checkpoints(tracker, models, main=True)

    with pytest.raises(PipelineError) as raised, saved.filed(), tracker:
        try:
            assert tracker.starting(), "the run was made at once: nothing set aside, nothing tested"
            saved.begin(small_state(0, "new"))
        finally:
            busy.rollback()
    busy.close()

    assert str(raised.value) == f"cannot write {models / checkpoint.CHECKPOINT_FILE}: {NO_SPACE}"
    assert tracker.run_id is not None  # made: the older files were not put back for that
    assert {p.name: p.read_bytes() for p in sorted(models.iterdir())} == before
    assert "no checkpoint was written" in caplog.text and "are back as they were" in caplog.text
    assert leftovers(models.parent) == []


def test_filing_the_last_checkpoint_under_its_run_on_a_full_disk_loses_nothing(
    small_disk: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The newest checkpoint was written before its run's id was known; on the way out the
    id cannot be written into it (the disk filled meanwhile). Training still ends well, the
    checkpoint stays intact with the run's key, and that key finds the run (a resume's way)."""
    from mlflow import MlflowClient

    from imgpipe import resume
    from imgpipe.tracking.create import find_run_once

    models = small_disk("4m") / "models"
    tracker, busy = busy_tracker(tmp_path, "key-1")
    saved = resume.Checkpoints(tracker, models, main=True)

    with saved.filed(), tracker:
        saved.add(small_state(1, "key-1"))
        assert tracker.starting(), "the run was made before the checkpoint: nothing tested"
        fill(models.parent, leave=0)
        busy.rollback()
    busy.close()

    target = models / checkpoint.CHECKPOINT_FILE
    assert f"cannot write {target}: {NO_SPACE}" in caplog.text
    assert f"by which a resume finds run {tracker.run_id}" in caplog.text
    found = checkpoint.load_latest(models)
    assert found is not None
    state, path = found
    assert (path, state.epoch, state.run_id, state.run_key) == (target, 1, None, "key-1")
    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e")
    assert find_run_once(client, [experiment.experiment_id], "key-1").info.run_id == tracker.run_id
    assert leftovers(models.parent) == []
