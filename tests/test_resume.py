"""Resume: killed, extended or damaged runs continue to exactly where a straight run ends."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from helpers import assert_same_weights
from imgpipe import checkpoint
from imgpipe.config import TrainConfig
from imgpipe.data import process_dataset
from imgpipe.errors import PipelineError
from imgpipe.testing import REPO, dvc, empty_store, make, project_env, run_outputs, train_config
from imgpipe.train import METRIC_NAMES, train


@pytest.fixture
def cfg(tmp_path: Path, few_processed: Path, monkeypatch: pytest.MonkeyPatch) -> TrainConfig:
    monkeypatch.chdir(tmp_path)
    return train_config(
        few_processed, tmp_path / "run", store=tmp_path / "store" / "mlflow.db", epochs=3
    )


def in_dir(cfg: TrainConfig, root: Path, **changes) -> TrainConfig:
    return replace(cfg, **run_outputs(root), **changes)


def run_history(cfg: TrainConfig) -> dict[str, list[tuple[int, float]]]:
    """Per metric, (step, value) pairs of the MLflow run the final checkpoint names."""
    from mlflow import MlflowClient

    state = checkpoint.load(Path(cfg.model_checkpoint_dir_path) / "checkpoint.pt")
    client = MlflowClient(cfg.mlflow_tracking_uri)
    assert client.get_run(state["mlflow_run_id"]).info.status == "FINISHED"
    return {
        name: sorted(
            (m.step, m.value) for m in client.get_metric_history(state["mlflow_run_id"], name)
        )
        for name in METRIC_NAMES
    }


def live_files(cfg: TrainConfig) -> dict[str, str]:
    root = Path(cfg.live_dir_path) / "plots" / "metrics"
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.tsv"))}


def assert_same_run(resumed: TrainConfig, straight: TrainConfig) -> None:
    assert_same_weights(resumed, straight)
    history = run_history(resumed)
    assert history == run_history(straight)
    for name, points in history.items():  # exactly one value per epoch
        assert [step for step, _ in points] == list(range(1, straight.epochs + 1)), name
    assert live_files(resumed) == live_files(straight)


def test_extending_a_finished_run_equals_a_straight_run(cfg: TrainConfig, tmp_path: Path) -> None:
    train(cfg)
    first_run = checkpoint.load(Path(cfg.model_checkpoint_dir_path) / "checkpoint.pt")[
        "mlflow_run_id"
    ]
    extended = replace(cfg, epochs=5, resume=True)
    train(extended)
    straight = in_dir(cfg, tmp_path / "straight", epochs=5)
    train(straight)
    assert_same_run(extended, straight)
    state = checkpoint.load(Path(cfg.model_checkpoint_dir_path) / "checkpoint.pt")
    assert state["mlflow_run_id"] == first_run and state["epoch"] == 5


def test_truncated_newest_checkpoint_falls_back_to_the_previous(
    cfg: TrainConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train(cfg)
    newest = Path(cfg.model_checkpoint_dir_path) / "checkpoint.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="imgpipe"):
        train(replace(cfg, epochs=4, resume=True))
    assert "unreadable" in caplog.text and "previous checkpoint" in caplog.text
    assert checkpoint.load(newest)["history"][-1]["epoch"] == 4
    straight = in_dir(cfg, tmp_path / "straight", epochs=4)
    train(straight)
    assert_same_run(replace(cfg, epochs=4), straight)


def test_no_readable_checkpoint_is_an_error_not_a_restart(cfg: TrainConfig) -> None:
    train(replace(cfg, epochs=2))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (Path(cfg.model_checkpoint_dir_path) / name).write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="no readable checkpoint"):
        train(replace(cfg, resume=True))


def test_checkpoint_of_another_model_is_refused(
    cfg: TrainConfig, small_raw: Path, tmp_path: Path
) -> None:
    train(replace(cfg, epochs=1))
    other = tmp_path / "other-processed"
    process_dataset(small_raw, other, num_workers=1)
    with pytest.raises(PipelineError, match="different model or data"):
        train(replace(cfg, data_dir_path=str(other), resume=True))


def test_resume_without_checkpoint_starts_fresh_and_says_so(
    cfg: TrainConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="imgpipe"):
        train(replace(cfg, epochs=1, resume=True, setup_mlflow=False))
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text


def test_resuming_a_run_that_already_reached_its_epochs_ends_it_finished(
    cfg: TrainConfig,
) -> None:
    """A kill after the last checkpoint but before the run's status was set: the resume has
    no epoch left to train, and still logs the model and ends the run FINISHED."""
    from mlflow import MlflowClient

    first = train(replace(cfg, epochs=1))
    client = MlflowClient(cfg.mlflow_tracking_uri)
    client.update_run(first.run_id, status="RUNNING")  # as a SIGKILL at the end leaves it
    again = train(replace(cfg, epochs=1, resume=True))
    assert again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert again.test_accuracy == first.test_accuracy


def test_resume_false_starts_a_new_run_even_with_a_checkpoint(cfg: TrainConfig) -> None:
    path = Path(cfg.model_checkpoint_dir_path) / "checkpoint.pt"
    train(replace(cfg, epochs=1))
    first = checkpoint.load(path)["mlflow_run_id"]
    train(replace(cfg, epochs=1))
    second = checkpoint.load(path)
    assert second["mlflow_run_id"] != first and second["epoch"] == 1
    assert not (path.parent / "checkpoint.prev.pt").exists() or (
        checkpoint.load(path.parent / "checkpoint.prev.pt")["mlflow_run_id"]
        == second["mlflow_run_id"]
    )


def test_a_checkpoint_saved_before_its_run_id_was_known_resumes_into_that_run(
    cfg: TrainConfig, tmp_path: Path
) -> None:
    """Epoch 0's checkpoint (and on a short epoch, later ones) is written while the MLflow
    run is still being made, so a kill then leaves a checkpoint with the run's key and no
    id: `imgpipe sync` and the resume find the run by its key; one run, every epoch once."""
    from mlflow import MlflowClient

    from imgpipe.tracking.sync import sync

    first = train(replace(cfg, epochs=2))
    models = Path(cfg.model_checkpoint_dir_path)
    state, _ = checkpoint.load_latest(models)
    client = MlflowClient(cfg.mlflow_tracking_uri)
    assert client.get_run(first.run_id).data.tags["imgpipe.creation_key"] == state.run_key
    state.run_id = None  # as a kill before the run's id was known leaves it
    state.save(models, keep_previous=False)
    client.update_run(first.run_id, status="RUNNING")

    assert f"MLflow run {first.run_id} at " in sync(models)
    resumed = replace(cfg, epochs=3, resume=True)
    assert train(resumed).run_id == first.run_id
    assert checkpoint.load(models / "checkpoint.pt")["mlflow_run_id"] == first.run_id
    experiment = client.get_experiment_by_name(cfg.mlflow_exp_name)
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [first.run_id]
    straight = in_dir(cfg, tmp_path / "straight", epochs=3, mlflow_exp_name="straight")
    train(straight)
    assert_same_run(resumed, straight)


# --------------------------------------------------------------------------- kill -9


class Lines:
    """A training's stderr lines as a thread reads them, each with the moment it arrived."""

    def __init__(self) -> None:
        self.arrived: list[tuple[float, str]] = []
        self.closed = False
        self._changed = threading.Condition()

    def add(self, line: str | None) -> None:
        with self._changed:
            if line is None:
                self.closed = True
            else:
                self.arrived.append((time.monotonic(), line))
            self._changed.notify_all()

    def at(self, text: str, timeout: float = 120) -> float:
        """When the first line holding ``text`` arrived (time.monotonic()); waits for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [t for t, line in self.arrived if text in line]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                assert not self.closed and left > 0, f"no line with {text!r}: {self}"
                self._changed.wait(left)

    def wait_closed(self, timeout: float = 30) -> str:
        """Every line, once the process closed its stderr."""
        with self._changed:
            self._changed.wait_for(lambda: self.closed, timeout)
        return str(self)

    def __str__(self) -> str:
        return "".join(line for _, line in self.arrived)


def start_training(cfg: TrainConfig, experiment: str) -> tuple[subprocess.Popen, Lines]:
    args = [
        f"epochs={cfg.epochs}",
        f"train_bs={cfg.train_bs}",
        f"data_dir_path={cfg.data_dir_path}",
        f"mlflow_tracking_uri={cfg.mlflow_tracking_uri}",
        f"mlflow_exp_name={experiment}",
        f"model_checkpoint_dir_path={cfg.model_checkpoint_dir_path}",
        f"live_dir_path={cfg.live_dir_path}",
        f"log_dir={cfg.log_dir}",
        f"resume={cfg.resume}",
        f"setup_mlflow={cfg.setup_mlflow}",
    ]
    workdir = Path(cfg.log_dir).parent
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-u", str(REPO / "src" / "train_model.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
    )
    lines = Lines()

    def read() -> None:
        for line in proc.stderr:
            lines.add(line)
        lines.add(None)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


TRAINING = "training on"


def epoch_line(epoch: int, epochs: int) -> str:
    return f"epoch {epoch}/{epochs}  train loss"  # logged once the epoch is done


def run_to_end(cfg: TrainConfig, experiment: str) -> dict[int, float]:
    """Run training; return how many seconds after its 'training on' line each of its
    epochs' lines came, by epoch, and when it ended (key 0)."""
    proc, lines = start_training(cfg, experiment)
    start = lines.at(TRAINING)
    assert proc.wait(300) == 0, str(lines)
    timeline = {0: time.monotonic() - start}
    lines.wait_closed()
    for epoch in range(1, cfg.epochs + 1):
        found = [at for at, line in lines.arrived if epoch_line(epoch, cfg.epochs) in line]
        timeline |= {epoch: found[0] - start} if found else {}  # a resume skips done epochs
    return timeline


def kill_moments(straight: dict[int, float], epochs: int, draw: random.Random) -> list:
    """(line, seconds after it, what the kill cuts into): one moment in each phase of the
    straight run, drawn at random inside it, and one anywhere. Phases as short as a
    checkpoint's write get a moment of their own, which draws over the whole run seldom
    gave them."""
    end = straight[0]
    return [
        (TRAINING, draw.uniform(0, straight[1]),
         "the first epoch: the MLflow run being created, epoch 0's checkpoint"),
        (epoch_line(1, epochs), draw.uniform(0, (straight[2] - straight[1]) / 10),
         "right after epoch 1: its checkpoint being written and renamed over epoch 0's"),
        (epoch_line(2, epochs), draw.uniform(0, straight[3] - straight[2]),
         "the middle of a later epoch, two checkpoints on disk"),
        (epoch_line(epochs, epochs), draw.uniform(0, end - straight[epochs]),
         "after the last epoch: its checkpoint, model.pt, the MLflow model, the run's end"),
        (TRAINING, draw.uniform(0, end), "any moment"),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", pytest.param("server", marks=pytest.mark.server)])
def test_sigkill_at_any_moment_then_resume_ends_like_a_straight_run(
    store: str, request: pytest.FixtureRequest, few_processed: Path, tmp_path: Path
) -> None:
    uri = (
        request.getfixturevalue("mlflow_server")
        if store == "server"
        else f"sqlite:///{empty_store(tmp_path / 'store' / 'mlflow.db')}"
    )
    base = TrainConfig(
        epochs=4, train_bs=16, data_dir_path=str(few_processed), mlflow_tracking_uri=uri
    )
    experiment = f"kill-{store}-{tmp_path.name}"
    straight = in_dir(base, tmp_path / "straight")
    timeline = run_to_end(straight, experiment)

    seed = int(os.environ.get("IMGPIPE_KILL_SEED", random.randrange(2**31)))
    print(f"kill moments drawn with IMGPIPE_KILL_SEED={seed}")
    for i, (line, delay, phase) in enumerate(
        kill_moments(timeline, base.epochs, random.Random(seed))
    ):
        killed = in_dir(base, tmp_path / f"kill-{i}")
        proc, lines = start_training(killed, experiment)
        time.sleep(max(0.0, lines.at(line) + delay - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        run_to_end(replace(killed, resume=True), experiment)
        try:
            assert_same_run(killed, straight)
        except AssertionError:
            print(f"kill #{i}, {delay:.2f}s after {line!r} ({phase}; seed {seed}) broke the run")
            raise


@pytest.mark.slow
def test_dvc_repro_after_a_killed_dvc_repro_resumes(project: Path) -> None:
    from mlflow import MlflowClient

    assert make("data", project).returncode == 0
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params.update(resume=True, epochs=6, train_bs=16)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    env = project_env()
    proc = subprocess.Popen(
        [str(Path(sys.prefix) / "bin" / "dvc"), "repro", "train"],
        cwd=project,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "epoch 3/6" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(60)
    assert any("epoch 3/6" in line for line in seen), "".join(seen)

    again = dvc(project, "repro", "train")
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"resuming after epoch [23] ", again.stdout + again.stderr), again.stderr

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("image-classification").experiment_id])
    (run,) = [r for r in runs if client.get_metric_history(r.info.run_id, "val/loss")]
    for name in METRIC_NAMES:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == list(
            range(1, 7)
        )
    rows = (project / "dvclive" / "plots" / "metrics" / "val" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == [str(e) for e in range(1, 7)]
    assert "up to date" in dvc(project, "status", "train").stdout


def test_a_run_refused_after_training_began_puts_the_older_checkpoints_back(
    cfg: TrainConfig, tmp_path: Path
) -> None:
    """A fresh training checkpoints without waiting for its MLflow run. When the store
    refuses the run only after epochs were checkpointed (busy until epoch 2, then the
    experiment turns out deleted), training stops with one line and the checkpoints of the
    run before are back, byte for byte, with nothing of the refused run left beside them."""
    import sqlite3

    from mlflow import MlflowClient

    experiment = "refused-later"
    before_run = in_dir(cfg, tmp_path / "a", epochs=1)
    run_to_end(before_run, experiment)
    models = Path(before_run.model_checkpoint_dir_path)
    before = {p.name: p.read_bytes() for p in sorted(models.iterdir())}
    assert {"checkpoint.pt", "checkpoint.prev.pt", "model.pt"} <= set(before)
    client = MlflowClient(before_run.mlflow_tracking_uri)
    client.delete_experiment(client.get_experiment_by_name(experiment).experiment_id)

    # Another process holds the store's write lock: the run cannot be made meanwhile.
    busy = sqlite3.connect(before_run.mlflow_tracking_uri.removeprefix("sqlite:///"))
    busy.execute("BEGIN EXCLUSIVE")
    try:
        proc, lines = start_training(replace(before_run, epochs=30, resume=False), experiment)
        lines.at("epoch 2/30")  # trained and checkpointed on, without the run
    finally:
        busy.rollback()
        busy.close()
    assert proc.wait(120) == 2, str(lines)
    output = lines.wait_closed()
    (line,) = [x for x in output.splitlines() if x.startswith("error:")]
    assert f"experiment '{experiment}' is deleted" in line and "restore it" in line, line
    assert "the checkpoints in" in output and "are back as they were" in output
    assert "Traceback" not in output
    assert {p.name: p.read_bytes() for p in sorted(models.iterdir())} == before


def test_a_stop_files_the_checkpoint_it_wrote_not_the_weights_it_moved_to(tmp_path: Path) -> None:
    """The newest checkpoint, written while the MLflow run was still being made, is filed
    under the run's id when training stops halfway through the next epoch. What is filed is
    that checkpoint (its epoch's weights, read back), never the weights the stopped epoch
    had moved to since: a resume from it must continue from where the epoch began."""
    import signal
    import sqlite3

    import torch

    from imgpipe import resume
    from imgpipe.checkpoint import TrainingState
    from imgpipe.stop import Stopped
    from imgpipe.tracking import RunSpec, Tracker

    store = empty_store(tmp_path / "store" / "mlflow.db")
    models = tmp_path / "models"
    spec = RunSpec(
        tracking_uri=f"sqlite:///{store}", experiment_name="e", run_name="r", run_key="key-1"
    )
    net = torch.nn.Linear(3, 2)
    busy = sqlite3.connect(store)  # the store is busy: the run is made only once it is free
    busy.execute("BEGIN EXCLUSIVE")
    tracker = Tracker(tmp_path / "dvclive", spec, images=False)
    saved = resume.Checkpoints(tracker, models, main=True)
    with pytest.raises(Stopped), saved.filed(), tracker:
        state = TrainingState(
            epoch=2, global_step=8, fingerprint="f", config={}, model=net.state_dict(),
            optimizer={}, scheduler={}, rng={}, run_key="key-1",
        )  # fmt: skip
        saved.add(state)
        assert tracker.starting(), "the run was made before the checkpoint: nothing tested"
        written = net.weight.detach().clone()
        with torch.no_grad():
            net.weight.add_(1.0)  # half of epoch 3 ...
        busy.rollback()
        raise Stopped(signal.SIGTERM, " after epoch 2")  # ... then the stop
    busy.close()
    filed = checkpoint.load(models / "checkpoint.pt")
    assert filed["mlflow_run_id"] == tracker.run_id is not None
    assert filed["epoch"] == 2
    assert torch.equal(filed["model"]["weight"], written)


def test_a_training_killed_with_older_checkpoints_set_aside_leaves_no_temp_behind(
    cfg: TrainConfig, tmp_path: Path
) -> None:
    """A fresh training killed while its MLflow run was still being made leaves the older
    checkpoints set aside as temp files. The next fresh training removes them, whether or
    not it has a run to wait for (here MLflow is off): models/ is a DVC output, and a temp
    there would be cached."""
    import sqlite3

    experiment = "killed-aside"
    before_run = in_dir(cfg, tmp_path / "a", epochs=1)
    run_to_end(before_run, experiment)
    models = Path(before_run.model_checkpoint_dir_path)
    aside = models / f".{checkpoint.CHECKPOINT_FILE}.before.tmp"

    busy = sqlite3.connect(before_run.mlflow_tracking_uri.removeprefix("sqlite:///"))
    busy.execute("BEGIN EXCLUSIVE")  # the killed training's run cannot be made
    try:
        proc, lines = start_training(replace(before_run, epochs=30, resume=False), experiment)
        lines.at(epoch_line(1, 30))
        deadline = time.monotonic() + 60
        while not aside.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()
        proc.wait(30)
    finally:
        busy.rollback()
        busy.close()
    assert aside.exists(), f"nothing was set aside: nothing tested\n{lines}"

    run_to_end(replace(before_run, epochs=2, resume=False, setup_mlflow=False), experiment)

    assert sorted(p.name for p in models.iterdir() if p.name.startswith(".")) == []
    assert checkpoint.load(models / checkpoint.CHECKPOINT_FILE)["epoch"] == 2
