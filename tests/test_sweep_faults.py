"""Sweeps and their database: PostgreSQL restarting or stalling under a running sweep (a TCP
proxy on 127.0.0.1 in front of the machine's PostgreSQL, imgpipe.testing.FaultProxy), and
workers that tell each other apart across PID namespaces."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import IN_CI
from imgpipe.testing import REPO, FaultProxy

pytestmark = pytest.mark.slow

POSTGRES = ("127.0.0.1", 5432)
POSTGRES_URL = "postgresql://postgres@{host}:{port}/test"


def postgres_or_skip() -> None:
    try:
        socket.create_connection(POSTGRES, timeout=2).close()
    except OSError as exc:
        if IN_CI:
            pytest.fail(f"CI must provide PostgreSQL on {POSTGRES}: {exc}")
        pytest.skip(f"no PostgreSQL on {POSTGRES}")


def test_the_fault_proxy_shows_a_client_a_restart_and_a_stall_as_the_database_would() -> None:
    """What the sweep's database client meets below: its connection cut and a new one
    refused while PostgreSQL restarts, then one that works; a query held while it stalls,
    answered once it forwards again."""
    import psycopg

    postgres_or_skip()
    with FaultProxy(POSTGRES[1]) as proxy:
        url = POSTGRES_URL.format(host="127.0.0.1", port=proxy.port)
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            proxy.drop(2.0)
            with pytest.raises(psycopg.OperationalError, match="closed the connection"):
                conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="closed the connection"):
            psycopg.connect(url, connect_timeout=5)
        time.sleep(2.0)
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
            proxy.stall()
            answered: list[tuple] = []
            query = threading.Thread(
                target=lambda: answered.append(conn.execute("SELECT 3").fetchone())
            )
            query.start()
            query.join(1.0)
            assert answered == []  # held
            proxy.forward()
            query.join(10)
            assert answered == [(3,)]


def test_a_database_restart_and_a_30s_stall_mid_sweep_lose_no_trial(
    sample_processed: Path, tmp_path: Path
) -> None:
    import optuna

    postgres_or_skip()
    proxy = FaultProxy(POSTGRES[1])
    url = POSTGRES_URL.format(host="127.0.0.1", port=proxy.port)
    direct = POSTGRES_URL.format(host=POSTGRES[0], port=POSTGRES[1])
    study_name = f"faults-{uuid.uuid4().hex[:10]}"
    env = os.environ | {"IMGPIPE_SWEEP_HEARTBEAT_S": "2", "IMGPIPE_SWEEP_GRACE_S": "8"}
    args = [
        "--multirun",
        f"data_dir_path={sample_processed}",
        "epochs=3",
        "lr=interval(0.5,2.0)",
        f"hydra.sweeper.storage={url}",
        f"hydra.sweeper.study_name={study_name}",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        f"hydra.sweep.dir={tmp_path / 'sweep' / 'results'}",
        "setup_mlflow=false",
        f"log_dir={tmp_path / 'logs'}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-u", str(REPO / "src" / "train_model.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("epoch 1/3" in line for line in lines):  # trials are training
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        proxy.drop()  # a restart: every connection cut, new ones refused for 2 s
        time.sleep(2)
        proxy.forward()
        while sum("epoch" in line for line in lines) < 6 and proc.poll() is None:
            time.sleep(0.2)
        proxy.stall()  # stops answering for 30 s: longer than the grace period
        time.sleep(30)
        proxy.forward()
        proc.wait(timeout=400)
        reader.join(5)
        output = "".join(lines)
        assert proc.returncode == 0, output
        assert "Traceback" not in output
        study = optuna.load_study(study_name=study_name, storage=direct)
        states = [t.state.name for t in study.trials]
        assert states.count("COMPLETE") == 4, states
        assert "FAIL" not in states, states  # no trial failed (and so none trained twice)
        # Every trial trained its epochs once: 3 epoch lines per trial, no more.
        assert sum("/3  train loss" in line for line in lines) == 12, output
    finally:
        proc.kill()
        proxy.close()
        optuna.delete_study(study_name=study_name, storage=direct)


IDENTITY = (
    "import json; from imgpipe.sweep.study import worker_identity; "
    "print(json.dumps(worker_identity()))"
)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_a_live_worker_in_another_pid_namespace_is_never_failed_by_a_neighbour(
    tmp_path: Path,
) -> None:
    """Same host name, same boot, another PID namespace (a container with host networking):
    its pid means nothing here, so only the heartbeat may judge it."""
    import optuna
    from optuna.trial import TrialState

    from imgpipe.sweep.study import IDENTITY_OF, fail_dead_local_trials, worker_identity

    other = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-c", IDENTITY],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(other.stdout)
    mine = worker_identity()
    assert theirs["host"] == mine["host"] and theirs["boot_id"] == mine["boot_id"]
    assert theirs["pid_ns"] != mine["pid_ns"]

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage)
    gone = dead_pid()
    neighbour = study.ask()  # alive in its namespace; its pid number is dead here
    for key, value in (theirs | {"pid": gone, IDENTITY_OF: neighbour.number}).items():
        neighbour.set_user_attr(key, value)
    ours = study.ask()  # a worker of this namespace that died
    for key, value in (mine | {"pid": gone, IDENTITY_OF: ours.number}).items():
        ours.set_user_attr(key, value)

    fail_dead_local_trials(study, storage)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[neighbour.number] == TrialState.RUNNING
    assert states[ours.number] == TrialState.FAIL
    retried = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert len(retried) == 1 and retried[0].user_attrs["pid"] == gone


def test_a_retry_taken_by_a_live_worker_is_not_judged_by_the_pid_it_inherited(
    tmp_path: Path,
) -> None:
    """A retried trial carries its dead worker's attributes (Optuna's retry copies them)
    until the worker that takes it records its own. A neighbour looking in between must not
    fail it again: a rerun's worker crashed so once (`Cannot tell a FAIL trial`)."""
    import optuna
    from optuna.trial import TrialState

    from imgpipe.sweep.study import fail_dead_local_trials, trial_identity

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage)
    gone = dead_pid()
    first = study.ask()
    for key, value in (trial_identity(first.number) | {"pid": gone}).items():
        first.set_user_attr(key, value)
    fail_dead_local_trials(study, storage)  # its worker is gone: failed, its retry queued
    retry = study.ask()  # taken by a live worker that has not recorded itself yet
    assert retry.number != first.number and retry.user_attrs["pid"] == gone  # inherited

    fail_dead_local_trials(study, storage)  # a neighbour looks in between
    assert study.get_trials()[retry.number].state == TrialState.RUNNING
    for key, value in trial_identity(retry.number).items():  # as run_trial records it
        retry.set_user_attr(key, value)
    fail_dead_local_trials(study, storage)
    assert study.get_trials()[retry.number].state == TrialState.RUNNING
    study.tell(retry, 1.0)  # the worker that took it tells its end
    assert study.get_trials()[retry.number].state == TrialState.COMPLETE


# Workers that start together on one SQLite study, as a sweep's rerun does: each takes
# trials (``take`` waiting ones) or looks after dead ones (``look``) ten times at once.
RACE = """
import sys, time
import optuna
from imgpipe.sweep.study import open_storage
from imgpipe.sweep.worker import look_after_dead_trials, take_trial
optuna.logging.set_verbosity(optuna.logging.WARNING)
what, url, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
storage = open_storage(url)
study = optuna.load_study(study_name="race", storage=storage)
time.sleep(max(0.0, start - time.time()))
for _ in range(10):
    if what == "take":
        print(take_trial(study, url).number, flush=True)
    else:
        look_after_dead_trials(study, storage, url)
"""


def race(what: str, url: str, processes: int) -> list[str]:
    start = time.time() + 6  # every process imported and connected: they start together
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, what, url, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [line for out, _ in outs for line in out.split()]


def test_a_waiting_trial_goes_to_one_worker_of_many_on_sqlite(tmp_path: Path) -> None:
    """SQLite does not lock the row Optuna reads before it marks a waiting trial RUNNING:
    workers starting together (a rerun after a stop) both took one retried trial, and one
    crashed (CI: `Cannot tell a FAIL trial` in the 2-worker SIGTERM rerun)."""
    import optuna
    from optuna.trial import TrialState

    from imgpipe.sweep.study import open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for x in range(20):
        study.enqueue_trial({"x": x}, skip_if_exists=False)

    taken = [int(n) for n in race("take", url, processes=4)]
    assert len(taken) == 40 and len(set(taken)) == 40  # no trial taken twice
    assert set(range(20)) <= set(taken)  # every waiting trial taken (once)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.RUNNING) == 40 and TrialState.WAITING not in states


def test_a_worker_takes_no_trial_while_another_holds_the_claim(tmp_path: Path) -> None:
    """The race above without its timing: while one process holds a SQLite study's claim,
    another's take waits; it takes its trial once the claim is released."""
    import optuna

    from imgpipe.sweep.study import claiming, open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    study.enqueue_trial({"x": 1})
    with claiming(url):
        taker = subprocess.Popen(
            [sys.executable, "-c", RACE.replace("range(10)", "range(1)"), "take", url, "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                taker.communicate(timeout=8)  # imports, connects, then waits for the claim
        except BaseException:
            taker.kill()
            raise
    out, err = taker.communicate(timeout=60)
    assert taker.returncode == 0, err[-2000:]
    assert out.split() == ["0"]  # the waiting trial, taken after the claim was released


def test_a_claim_held_by_a_killed_worker_is_free_at_once(tmp_path: Path) -> None:
    """A worker killed (SIGKILL, out of memory) while it holds the claim leaves nothing to
    clean up: the kernel drops its lock, and the next worker takes its trial at once."""
    import optuna

    from imgpipe.sweep.study import open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    study.enqueue_trial({"x": 1})
    holder = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_HANG, url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.kill()
        holder.wait(30)
        assert race("take", url, processes=1)[:1] == ["0"]  # the waiting trial, not stuck
    finally:
        holder.kill()


CLAIM_AND_HANG = """
import sys, time
from imgpipe.sweep.study import claiming
with claiming(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_dead_workers_trial_is_retried_once_by_many_workers_on_sqlite(tmp_path: Path) -> None:
    """Workers looking after dead trials at once: each dead trial is failed and queued
    again by one of them, so the sweep runs it once more, not once per worker."""
    import optuna
    from optuna.trial import TrialState

    from imgpipe.sweep.study import open_storage, trial_identity

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    gone = dead_pid()
    for _ in range(10):
        trial = study.ask()
        for key, value in (trial_identity(trial.number) | {"pid": gone}).items():
            trial.set_user_attr(key, value)

    race("look", url, processes=4)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.FAIL) == 10
    assert states.count(TrialState.WAITING) == 10  # one retry each
    assert len(states) == 20


def test_the_sweeps_parent_run_rides_out_a_tracking_outage(
    tmp_path: Path,
    mlflow_server: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tracking gone when the sweep ends: one warning, the sweep still ends; the same
    closing writes once tracking answers record everything, once."""
    from mlflow import MlflowClient

    from imgpipe.testing import free_port
    from imgpipe.tracking.parent import finish_parent_run

    client = MlflowClient(mlflow_server)
    parent = client.create_run(client.create_experiment(f"outage-{uuid.uuid4().hex[:8]}"))
    run_id = parent.info.run_id
    results = tmp_path / "results"
    results.mkdir()
    (results / "trials.csv").write_text("number,state\n0,COMPLETE\n")
    best = {
        "trial": 0,
        "params": {"lr": 1.1},
        "values": {"val/loss": 0.2, "val/accuracy": 0.93},
        "test": {},
        "mlflow_run_id": "",
    }
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    started = time.monotonic()
    finish_parent_run(
        gone,
        run_id,
        best,
        "FINISHED",
        best_at_ms=1_700_000_000_000,
        artifacts=[results / "trials.csv"],
        wait_s=2,
    )
    assert time.monotonic() - started < 60
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    warnings = [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]
    assert len(warnings) == 1 and "run the sweep again" in warnings[0]
    assert client.get_run(run_id).info.status == "RUNNING"

    for _ in range(2):  # the rerun, and once more: idempotent
        finish_parent_run(
            mlflow_server,
            run_id,
            best,
            "FINISHED",
            best_at_ms=1_700_000_000_000,
            artifacts=[results / "trials.csv"],
        )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["best_trial"] == "0"
    assert len(client.get_metric_history(run_id, "best/val/loss")) == 1
