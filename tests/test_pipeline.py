"""End to end, as a user runs it: `make run` (dvc repro) in a fresh git repo, then an experiment."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from imgpipe.testing import dvc, make

pytestmark = pytest.mark.slow


def mlflow_runs(project: Path, kind: str = "train") -> list:
    """Training runs (kind="train"), or the sweep's parent and trial runs (kind="sweep")."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classification")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    in_sweep = [r for r in runs if "optuna_study" in r.data.tags]
    return in_sweep if kind == "sweep" else [r for r in runs if r not in in_sweep]


def test_make_run_then_repro_then_experiment(project: Path) -> None:
    dvc_yaml = (project / "dvc.yaml").read_text()

    result = make("run", project)
    assert result.returncode == 0, result.stdout + result.stderr
    # The sample export matches the committed data.dvc byte for byte.
    status = dvc(project, "status", "data.dvc")
    assert "up to date" in status.stdout, status.stdout

    summary = json.loads((project / "dvclive" / "metrics.json").read_text())
    assert summary["test"]["accuracy"] >= 0.95
    assert summary["step"] == 10
    for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        rows = (project / "dvclive" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert len(rows) == 11, name  # header + one row per epoch
    for name in ("test/loss", "test/accuracy"):  # evaluated once, after the last epoch
        rows = (project / "dvclive" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert [r.split("\t")[0] for r in rows[1:]] == ["10"], name
    assert (project / "models" / "checkpoint.pt").is_file() and (
        project / "models" / "model.pt"
    ).is_file()
    assert (project / "data" / "processed" / "metadata.json").is_file()
    # The sweep stage ran the seed's 3 trials and wrote every declared output.
    results = project / "sweep" / "results"
    assert sorted(p.name for p in results.iterdir()) == [
        "best_params.yaml",
        "optimization_results.yaml",
        "pareto_front.png",
        "trials.csv",
    ]
    assert len((results / "trials.csv").read_text().splitlines()) == 4
    sweep_runs = mlflow_runs(project, "sweep")
    assert len(sweep_runs) == 4 and len({r.data.tags["hptuning_tag"] for r in sweep_runs}) == 1

    (run,) = mlflow_runs(project)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "1.0" and run.data.params["epochs"] == "10"
    assert run.data.tags["git_commit"] and len(run.data.tags["git_commit"]) == 40
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert history[-1].value == pytest.approx(summary["val"]["accuracy"])
    (tested,) = client.get_metric_history(run.info.run_id, "test/accuracy")
    assert tested.step == 10 and tested.value == pytest.approx(summary["test"]["accuracy"])

    # Nothing changed: a second repro runs no stage and writes no run.
    again = dvc(project, "repro")
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout
    assert len(mlflow_runs(project)) == 1 and len(mlflow_runs(project, "sweep")) == 4
    # dvclive never rewrote dvc.yaml; Hydra left no folders; metrics and plots render.
    assert (project / "dvc.yaml").read_text() == dvc_yaml
    assert not (project / "outputs").exists() and not (project / "multirun").exists()
    metrics = dvc(project, "metrics", "show", "--json")
    assert "test" in metrics.stdout and metrics.returncode == 0
    plots = dvc(project, "plots", "show", "-o", str(project / "plots-html"))
    assert plots.returncode == 0 and (project / "plots-html" / "index.html").is_file(), plots.stderr

    # An experiment with one value changed trains with it, in MLflow and in `dvc exp show`.
    exp = dvc(project, "exp", "run", "-S", "lr=1.4", "-n", "lr-1-4")
    assert exp.returncode == 0, exp.stdout + exp.stderr
    runs = mlflow_runs(project)
    assert len(runs) == 2
    assert runs[-1].data.params["lr"] == "1.4"
    assert runs[-1].data.tags.get("dvc_exp_name") == "lr-1-4"
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    exp_params = [
        e["data"]["params"]["params.yaml"]["data"]["lr"]
        for rev in shown
        for e in (rev.get("experiments") or [])
        for e in e.get("revs", [])
        if e.get("name") == "lr-1-4"
    ]
    assert exp_params == [1.4]
    # The store is one SQLite file under mlruns/, no file store.
    assert len(mlflow_runs(project, "sweep")) == 4  # lr is searched: the sweep did not rerun
    with sqlite3.connect(project / "mlruns" / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 6
