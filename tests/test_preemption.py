"""Preemption: SIGTERM (or SIGINT) stops training at a batch boundary, however it was
started, and resume=true then ends exactly like a run that was never stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from imgpipe import checkpoint
from imgpipe.config import TrainConfig
from imgpipe.stop import launchers
from imgpipe.testing import REPO, empty_store, make, project_env, run_outputs
from imgpipe.train import METRIC_NAMES
from test_resume import assert_same_run, epoch_line, in_dir, run_to_end, start_training
from test_sweep import load_study, sweep_args


def stop_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("stopped by ")]


def wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until a line holding ``text`` was read (by another thread) into ``lines``."""
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)


def session_alive(sid: int) -> list[int]:
    """Pids of the processes still in session ``sid`` (every process a test started)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def assert_session_ends(sid: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while (alive := session_alive(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"still running {within}s after the stop: {alive}"


def checkpointed_run_status(models: Path, uri: str) -> str:
    from mlflow import MlflowClient

    run_id = checkpoint.load(models / "checkpoint.pt")["mlflow_run_id"]
    return MlflowClient(uri).get_run(run_id).info.status


def test_only_launchers_that_pass_no_signal_on_are_watched() -> None:
    """Up to the nearest dvc, else the nearest make; a plain shell above is left alone, so
    a run under nohup outlives the terminal that started it."""
    chain = [(10, "sh"), (11, "make"), (12, "sh"), (13, "dvc"), (14, "bash")]
    assert launchers(chain) == chain[:4]
    assert launchers([(10, "sh"), (11, "make"), (14, "bash")]) == [(10, "sh"), (11, "make")]
    assert launchers([(14, "bash"), (1, "systemd")]) == []


def stop_mid_epoch(cfg: TrainConfig, experiment: str, signum: int) -> None:
    """Start training, send ``signum`` once the first epoch is done: a clean stop."""
    proc, lines = start_training(cfg, experiment)
    lines.at(epoch_line(1, cfg.epochs))
    proc.send_signal(signum)
    assert proc.wait(60) == 128 + signum, str(lines)
    (line,) = stop_lines(lines.wait_closed())
    name = signal.Signals(signum).name
    assert line.startswith(f"stopped by {name} after epoch ") and "resume=true" in line
    status = checkpointed_run_status(Path(cfg.model_checkpoint_dir_path), cfg.mlflow_tracking_uri)
    assert status == "KILLED"


@pytest.mark.slow
def test_sigterm_mid_epoch_stops_cleanly_and_resume_ends_like_a_straight_run(
    sample_processed: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{empty_store(tmp_path / 'store' / 'mlflow.db')}"
    base = TrainConfig(
        epochs=4, train_bs=16, data_dir_path=str(sample_processed), mlflow_tracking_uri=uri
    )
    experiment = f"stop-{tmp_path.name}"
    straight = in_dir(base, tmp_path / "straight")
    run_to_end(straight, experiment)

    stopped = in_dir(base, tmp_path / "stopped")
    stop_mid_epoch(stopped, experiment, signal.SIGTERM)
    run_to_end(replace(stopped, resume=True), experiment)
    assert_same_run(stopped, straight)


def test_ctrl_c_mid_epoch_stops_cleanly_with_130(sample_processed: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        epochs=4,
        train_bs=16,
        data_dir_path=str(sample_processed),
        mlflow_tracking_uri=f"sqlite:///{empty_store(tmp_path / 'store' / 'mlflow.db')}",
        **run_outputs(tmp_path / "run"),
    )
    stop_mid_epoch(cfg, f"ctrl-c-{tmp_path.name}", signal.SIGINT)


def set_params(project: Path, **values: object) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params.update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def start(cmd: list[str], project: Path) -> tuple[subprocess.Popen, list[str]]:
    import threading

    proc = subprocess.Popen(
        cmd,
        cwd=project,
        env=project_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return proc, lines


def assert_one_run_per_epoch(project: Path, epochs: int) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    assert checkpointed_run_status(project / "models", uri) == "FINISHED"
    client = MlflowClient(uri)
    run_id = checkpoint.load(project / "models" / "checkpoint.pt")["mlflow_run_id"]
    for name in METRIC_NAMES:
        steps = sorted(m.step for m in client.get_metric_history(run_id, name))
        assert steps == list(range(1, epochs + 1)), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(["make", "--no-print-directory", "train"], id="make-train"),
        pytest.param([str(Path(sys.prefix) / "bin" / "dvc"), "repro", "train"], id="dvc-repro"),
    ],
)
def test_sigterm_to_the_launcher_stops_training_cleanly(launcher: list[str], project: Path) -> None:
    """make passes SIGTERM to its recipe's shell only, DVC to nobody: training notices
    its launcher is gone, stops at a batch boundary, and nothing is left running."""
    assert make("data", project).returncode == 0
    if launcher[0] == "make":  # dvc repro runs the stage before train by itself
        assert make("process-data", project).returncode == 0
    set_params(project, epochs=4, train_bs=16, resume=True)
    proc, lines = start(launcher, project)
    wait_for(lines, "epoch 1/4", proc)
    proc.send_signal(signal.SIGTERM)  # the launcher alone, as a scheduler would
    assert_session_ends(proc.pid)
    proc.wait(10)  # reaped: DVC takes the pid of a zombie for a live holder of its lock
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    assert checkpointed_run_status(project / "models", uri) == "KILLED"
    logged = (project / "logs" / "imgpipe.jsonl").read_text()
    assert "stopped by SIGTERM after epoch" in logged, "".join(lines)

    again = subprocess.run(launcher, cwd=project, env=project_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming after epoch" in again.stdout + again.stderr
    assert_one_run_per_epoch(project, 4)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_to_a_sweep_stops_every_worker_and_the_rerun_completes_n_trials(
    workers: int, sample_processed: Path, tmp_path: Path
) -> None:
    args = sweep_args(
        tmp_path,
        sample_processed,
        "hydra.sweeper.n_trials=3",
        f"hydra.sweeper.n_jobs={workers}",
        # Trials long enough (several seconds) that the stop always lands inside one:
        # with 3 epochs a fast machine finished both workers' trials before it arrived.
        "epochs=10",
        "train_bs=32",
    )
    cmd = [sys.executable, "-u", str(REPO / "src" / "train_model.py"), *args]
    proc, lines = start(cmd, tmp_path)
    wait_for(lines, "epoch 1/10", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, "".join(lines)
    (line,) = stop_lines("".join(lines))
    assert line == "stopped by SIGTERM: run the sweep again to continue it"
    assert_session_ends(proc.pid)
    stopped = [t for t in load_study(tmp_path).trials if t.state.name == "FAIL"]
    assert stopped and not any("failure" in t.user_attrs for t in stopped)

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    trials = load_study(tmp_path).trials
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3
    retried = {t.system_attrs.get("failed_trial") for t in trials if t.state.name == "COMPLETE"}
    assert {t.number for t in stopped} <= retried  # each stopped trial went on from its checkpoint
