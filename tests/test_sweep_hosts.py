"""Sweep workers on other machines: one that dies mid-trial is failed by its stale heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import IN_CI
from imgpipe.testing import REPO, empty_store

pytestmark = pytest.mark.slow

OTHER_HOST = "other-host"


# Another host name and another PID namespace: this machine cannot see the process, as with
# a second machine (with the host name alone, its pid would be checked here and found dead).
UNSHARE = ["unshare", "-u", "--pid", "--fork"]


def unshare_or_skip() -> None:
    """A process under another host name stands in for a second machine (needs root)."""
    probe = subprocess.run(
        [*UNSHARE, "sh", "-c", f"hostname {OTHER_HOST} && hostname"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0 or probe.stdout.strip() != OTHER_HOST:
        reason = f"unshare -u is not permitted here: {probe.stderr.strip()}"
        if IN_CI:
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)


def trial_number(study, number: int):
    (found,) = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    return found


def wait_for(what: str, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_dying_on_another_host_is_retried_after_the_grace_period(
    few_processed: Path, tmp_path: Path
) -> None:
    import optuna

    unshare_or_skip()
    db = tmp_path / "shared" / "optuna.db"
    db.parent.mkdir()
    storage = f"sqlite:///{db}"
    study_name = f"hosts-{uuid.uuid4().hex[:8]}"
    results = tmp_path / "sweep" / "results"  # one folder for both: a shared file system

    def command(machine: str) -> list[str]:
        return [
            sys.executable,
            "-u",
            str(REPO / "src" / "train_model.py"),
            "--multirun",
            f"data_dir_path={few_processed}",
            "epochs=2",
            "lr=interval(0.5,2.0)",
            f"hydra.sweep.dir={results}",
            f"mlflow_tracking_uri=sqlite:///{empty_store(tmp_path / 'mlruns' / 'mlflow.db')}",
            f"log_dir={tmp_path / machine / 'logs'}",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.n_jobs=1",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.study_name={study_name}",
        ]

    env = os.environ | {"IMGPIPE_SWEEP_HEARTBEAT_S": "1", "IMGPIPE_SWEEP_GRACE_S": "6"}
    other = subprocess.Popen(
        [
            *UNSHARE,
            "sh",
            "-c",
            f'hostname {OTHER_HOST} && exec "$@"',
            "sh",
            *command("other"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    here = None
    try:

        def joinable_study():
            try:
                return optuna.load_study(study_name=study_name, storage=storage)
            except Exception:  # no tables or no study yet: the worker is still creating it
                return None

        study = wait_for("the study", joinable_study)

        def running_on_other_host():
            for t in study.get_trials(deepcopy=False):
                if t.state.name == "RUNNING" and t.user_attrs.get("host") == OTHER_HOST:
                    return t
            return None

        dead = wait_for("a trial running on the other host", running_on_other_host)
        # This machine's worker joins while the other machine's trial runs.
        here = subprocess.Popen(
            command("here"),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        checkpoint = results.parent / "study"

        def epoch_1_saved() -> bool:  # epoch 1's save keeps epoch 0's as the fallback
            return any(
                all((models / name).is_file() for name in ("checkpoint.pt", "checkpoint.prev.pt"))
                for models in checkpoint.glob(f"*/trials/{dead.number}/models")
            )

        wait_for("the dead trial's epoch 1 checkpoint", epoch_1_saved)
        os.killpg(other.pid, signal.SIGKILL)  # the other machine is gone mid-trial
        other.wait(30)
        assert trial_number(study, dead.number).state.name == "RUNNING"

        out, _ = here.communicate(timeout=300)
        assert here.returncode == 0, out
    finally:
        for proc in (other, here):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3
    # The dead trial was failed as a dead worker's (not counted), not as a failure of its own.
    dead = trial_number(study, dead.number)
    assert dead.state.name == "FAIL"
    assert "failure" not in dead.user_attrs
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.params == dead.params  # the same trial, again
    assert retry.user_attrs["host"] != OTHER_HOST  # this machine's worker took it over
    resumed = [line for line in out.splitlines() if "resuming after epoch 1 from" in line]
    assert len(resumed) == 1, out
    assert f"/trials/{dead.number}/models/" in resumed[0]  # the dead trial's own checkpoint
    # This machine's worker went on with trials of its own while the other's lay dead.
    assert [t for t in complete if t is not retry and t.user_attrs["host"] != OTHER_HOST]
    for proc in (other, here):
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # nothing of either machine's sweep is left running
