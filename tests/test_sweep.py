"""Sweeps: the seed's --multirun, parallel workers, shared PostgreSQL studies, resume, failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from helpers import IN_CI, error_lines, start_sweep
from imgpipe.testing import REPO, empty_store, run_script

pytestmark = pytest.mark.slow

POSTGRES_URL = os.environ.get(
    "IMGPIPE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def sweep_args(root: Path, data: Path, *extra: str) -> list[str]:
    """A sweep whose every output lives under ``root``."""
    return [
        "--multirun",
        f"data_dir_path={data}",
        "epochs=2",
        f"hydra.sweep.dir={root / 'sweep' / 'results'}",
        f"mlflow_tracking_uri=sqlite:///{empty_store(root / 'mlruns' / 'mlflow.db')}",
        f"log_dir={root / 'logs'}",
        *extra,
    ]


def load_study(root: Path):
    import optuna

    (db,) = (root / "sweep" / "study").glob("*/optuna.db")
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{db}")
    return optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{db}")


def all_output(root: Path, result: subprocess.CompletedProcess) -> str:
    """Everything a user could read: stdout, stderr, logs, results, MLflow store dumps."""
    text = result.stdout + result.stderr
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".jsonl", ".yaml", ".csv", ".json", ".txt"):
            text += path.read_text(errors="replace")
    return text


def test_seed_multirun_runs_the_configured_trials(few_processed: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    result = run_script("train_model.py", *sweep_args(tmp_path, few_processed), cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    results = tmp_path / "sweep" / "results"
    assert sorted(p.name for p in results.iterdir()) == [
        "best_params.yaml",
        "optimization_results.yaml",
        "pareto_front.png",
        "trials.csv",
    ]
    optimization = yaml.safe_load((results / "optimization_results.yaml").read_text())
    assert optimization["name"] == "optuna" and optimization["solutions"]
    assert (results / "pareto_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (results / "trials.csv").read_text().splitlines()
    assert rows[0].startswith(
        "number,state,params_lr,params_train_bs,values_val_loss,values_val_accuracy,"
        "test_loss,test_accuracy,"
    )
    assert len(rows) == 4 and all(",COMPLETE," in r for r in rows[1:])
    best = yaml.safe_load((results / "best_params.yaml").read_text())
    assert set(best["params"]) == {"lr", "train_bs"}

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("image-classification").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and len(runs) == 4
    tags = {r.data.tags["hptuning_tag"] for r in runs}
    assert len(tags) == 1 and tags.pop().isdigit()  # generated: the variable was unset
    assert sorted(r.data.tags["trial_number"] for r in children) == ["0", "1", "2"]
    assert parent.data.tags["best_trial"] == str(best["trial"])
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 2
    # Every trial trained into its own folder.
    checkpoints = sorted((tmp_path / "sweep" / "study").glob("*/trials/*/models/checkpoint.pt"))
    assert len(checkpoints) == 3


def test_two_workers_run_trials_at_the_same_time(few_processed: Path, tmp_path: Path) -> None:
    result = run_script(
        "train_model.py",
        *sweep_args(tmp_path, few_processed, "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    study = load_study(tmp_path)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4
    assert len({t.user_attrs["pid"] for t in done}) == 2
    overlapping = any(
        a.user_attrs["pid"] != b.user_attrs["pid"]
        and a.datetime_start < b.datetime_complete
        and b.datetime_start < a.datetime_complete
        for a in done
        for b in done
    )
    assert overlapping, [
        (t.number, t.user_attrs["pid"], t.datetime_start, t.datetime_complete) for t in done
    ]


def test_a_diverging_trial_fails_and_the_sweep_goes_on(few_processed: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    result = run_script(
        "train_model.py",
        *sweep_args(
            tmp_path,
            few_processed,
            "lr=choice(1.0,1e12)",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.sampler.seed=3",  # draws 1e12, 1.0, 1e12, 1.0
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    states = [t.state.name for t in load_study(tmp_path).trials]
    assert "FAIL" in states and "COMPLETE" in states and len(states) == 4
    rows = (tmp_path / "sweep" / "results" / "trials.csv").read_text()
    assert "diverged" in rows
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("image-classification").experiment_id])
    assert "FAILED" in {r.info.status for r in runs}


def test_a_sweep_where_every_trial_fails_exits_non_zero(
    few_processed: Path, tmp_path: Path
) -> None:
    result = run_script(
        "train_model.py",
        *sweep_args(tmp_path, few_processed, "lr=interval(1e11,1e12)", "hydra.sweeper.n_trials=2"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "all trials" in line and "failed" in line
    assert not (tmp_path / "sweep" / "results").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        pytest.param("lrr=range(1,3)", "unknown parameter 'lrr'", id="unknown-parameter"),
        pytest.param("lr=range(0.9,)", "malformed", id="malformed-range"),
        pytest.param("train_bs=choice()", "malformed", id="malformed-choice"),
        pytest.param("lr=interval(1)", "malformed", id="malformed-interval"),
        pytest.param("lr=range(0.9,1.7)", "single value", id="float-range-without-step"),
        pytest.param(
            "hydra.sweeper.storage=postgresql://bob:s3cretpw@127.0.0.1:1/none",
            "postgresql://bob:***@127.0.0.1:1/none",
            id="unreachable-storage",
        ),
    ],
)
def test_bad_sweep_input_stops_before_the_first_trial(
    few_processed: Path, tmp_path: Path, override: str, expected: str
) -> None:
    result = run_script(
        "train_model.py", *sweep_args(tmp_path, few_processed, override), cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert expected in line, result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cretpw" not in all_output(tmp_path, result)
    assert not list(tmp_path.glob("sweep/study/*/trials"))


def test_changed_code_or_config_starts_a_new_study(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-running the same sweep continues its study; other code or values start afresh."""
    import imgpipe.sweep.settings as sweep

    def study_dir(*args: str) -> str:
        return sweep.load_settings("train_model", list(args)).study_dir

    assert study_dir() == study_dir()
    assert study_dir("epochs=3") != study_dir()
    assert study_dir("hydra.sweeper.n_trials=9") == study_dir()  # more trials: same study
    before = study_dir()
    monkeypatch.setattr(sweep, "code_hash", lambda: "other-code")
    assert study_dir() != before


def test_an_existing_study_with_other_directions_is_refused(
    few_processed: Path, tmp_path: Path
) -> None:
    import optuna

    storage = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="image-classification", storage=storage, direction="maximize")
    result = run_script(
        "train_model.py",
        *sweep_args(tmp_path, few_processed, f"hydra.sweeper.storage={storage}"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "['maximize']" in line and "['minimize', 'maximize']" in line


def test_a_killed_sweep_resumes_where_it_stopped(few_processed: Path, tmp_path: Path) -> None:
    args = sweep_args(tmp_path, few_processed, "hydra.sweeper.n_trials=4", "epochs=4")
    proc = start_sweep(args, tmp_path)
    third_started = False
    for line in proc.stderr:
        third_started = third_started or "trial 2 (worker" in line
        if third_started and "epoch 1/4" in line:  # two trials done, the third mid-way
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(60)
    before = {t.number: t for t in load_study(tmp_path).trials}
    finished = {
        n: t.user_attrs["mlflow_run_id"] for n, t in before.items() if t.state.name == "COMPLETE"
    }
    assert sorted(finished) == [0, 1]

    again = run_script("train_model.py", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    study = load_study(tmp_path)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    # Finished trials were not rerun; the killed one was retried from its own checkpoint.
    assert {
        t.number: t.user_attrs["mlflow_run_id"] for t in complete if t.number in finished
    } == finished
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == 2]
    assert len(retried) == 1
    assert "resuming after epoch" in again.stderr  # the retry continued trial 2's checkpoint
    assert max(t.number for t in study.trials) >= 4  # numbering continued


def postgres_or_skip() -> str:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL)
        with engine.connect():
            pass
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"CI must provide PostgreSQL at {POSTGRES_URL}: {exc}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} ({type(exc).__name__})")
    return POSTGRES_URL


def test_machines_finishing_one_parent_run_at_once_all_succeed(
    tmp_path: Path, mlflow_server: str
) -> None:
    """Every machine of a shared study records the same best trial on the same parent run
    at about the same moment; none of them may fail on the others' writes."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    from imgpipe.sweep.results import RESULT_FILES
    from imgpipe.tracking.parent import finish_parent_run

    results = tmp_path / "results"
    results.mkdir()
    names = ("optimization_results.yaml", "best_params.yaml", "trials.csv", "pareto_front.png")
    for name in names:
        (results / name).write_text(name)
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"finish-{uuid.uuid4().hex[:8]}")
    best = {
        "trial": 5,
        "params": {"lr": 1.2, "train_bs": 48},
        "values": {"val/loss": 0.25, "val/accuracy": 0.9},
        "test": {"test/loss": 0.3, "test/accuracy": 0.875},
        "mlflow_run_id": "abc",
    }
    machines = 4
    for _ in range(5):  # the race needs the writes to meet; several parents make that likely
        parent = client.create_run(experiment).info.run_id
        barrier = threading.Barrier(machines)

        def finish(parent: str = parent, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            finish_parent_run(
                mlflow_server,
                parent,
                best,
                "FINISHED",
                best_at_ms=1_700_000_000_000,
                artifacts=[results / name for name in RESULT_FILES],
            )

        with ThreadPoolExecutor(machines) as pool:
            for done in [pool.submit(finish) for _ in range(machines)]:
                done.result()  # raises what that machine hit
        run = client.get_run(parent)
        assert run.info.status == "FINISHED"
        assert run.data.tags["best_trial"] == "5"
        assert run.data.tags["best_params.lr"] == "1.2"
        assert run.data.metrics == {
            "best/val/loss": 0.25,
            "best/val/accuracy": 0.9,
            "best/test/loss": 0.3,
            "best/test/accuracy": 0.875,
        }
        # Identical writes leave one point per metric, not one per machine.
        assert len(client.get_metric_history(parent, "best/val/loss")) == 1
        assert len(client.get_metric_history(parent, "best/test/loss")) == 1
        artifacts = {a.path for a in client.list_artifacts(parent, "sweep")}
        assert artifacts == {f"sweep/{name}" for name in names}


def test_three_machines_share_one_study_through_postgresql(
    few_processed: Path, tmp_path: Path, mlflow_server: str
) -> None:
    import optuna
    from mlflow import MlflowClient

    url = postgres_or_skip()
    # A password in the URL must never show: trust auth accepts any.
    secret_url = url.replace("postgres@", "postgres:pw-s3cret@", 1)
    study_name = f"test-{uuid.uuid4().hex[:12]}"
    common = [
        "--multirun",
        f"data_dir_path={few_processed}",
        "epochs=2",
        f"hydra.sweeper.storage={secret_url}",
        f"hydra.sweeper.study_name={study_name}",
        "hydra.sweeper.n_trials=6",
        "lr=interval(0.5,2.0)",
        f"mlflow_tracking_uri={mlflow_server}",  # machines share a tracking server
        f"mlflow_exp_name={study_name}",
    ]
    procs = []
    for machine in range(3):
        root = tmp_path / f"machine-{machine}"
        root.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-u",
                    str(REPO / "src" / "train_model.py"),
                    *common,
                    f"hydra.sweep.dir={root / 'sweep' / 'results'}",
                    f"log_dir={root / 'logs'}",
                ],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outputs, strict=True):
            assert p.returncode == 0, err
        study = optuna.load_study(study_name=study_name, storage=url)
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert len(complete) == 6
        assert len({tuple(sorted(t.params.items())) for t in complete}) == 6
        assert len({t.user_attrs["pid"] for t in complete}) >= 2

        client = MlflowClient(mlflow_server)
        runs = client.search_runs([client.get_experiment_by_name(study_name).experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert {r.data.tags["trial_number"] for r in children} == {str(t.number) for t in complete}
        # Every machine recorded the same best trial on the parent and ended it.
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["best_trial"] in {str(t.number) for t in complete}
        assert len(client.get_metric_history(parent.info.run_id, "best/val/loss")) == 1
        assert len({r.data.tags["hptuning_tag"] for r in runs}) == 1
        everything = "".join(out + err for out, err in outputs)
        for root in tmp_path.glob("machine-*"):
            everything += "".join(
                p.read_text(errors="replace")
                for p in root.rglob("*")
                if p.is_file() and p.suffix in (".jsonl", ".yaml", ".csv")
            )
        for run in runs:
            everything += repr(run.data.params) + repr(run.data.tags)
        assert "pw-s3cret" not in everything
    finally:
        for p in procs:
            p.kill()
        optuna.delete_study(study_name=study_name, storage=url)
