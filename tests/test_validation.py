"""Tune on val, touch test once: val metrics every epoch, test metrics once at the end, and the
sweep choosing on val while its parent run reports the chosen trial's test metrics."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from imgpipe import checkpoint
from imgpipe.config import TrainConfig
from imgpipe.testing import empty_store, run_script, train_config
from imgpipe.train import train


@pytest.fixture
def cfg(tmp_path: Path, sample_processed: Path, monkeypatch: pytest.MonkeyPatch) -> TrainConfig:
    monkeypatch.chdir(tmp_path)
    return train_config(sample_processed, tmp_path, epochs=2)


def steps(cfg: TrainConfig, run_id: str, name: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    history = MlflowClient(cfg.mlflow_tracking_uri).get_metric_history(run_id, name)
    return sorted((m.step, m.value) for m in history)


def test_val_every_epoch_test_once_and_the_objectives_are_val(cfg: TrainConfig) -> None:
    result = train(cfg)
    assert result.objectives == (result.val_loss, result.val_accuracy)

    for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert [s for s, _ in steps(cfg, result.run_id, name)] == [1, 2], name
    assert steps(cfg, result.run_id, "val/loss")[-1][1] == result.val_loss
    assert steps(cfg, result.run_id, "test/loss") == [(2, result.test_loss)]
    assert steps(cfg, result.run_id, "test/accuracy") == [(2, result.test_accuracy)]
    assert result.test_loss != result.val_loss  # two different splits were scored

    live = Path(cfg.live_dir_path)
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["val"]["loss"] == pytest.approx(result.val_loss)
    assert summary["test"]["loss"] == pytest.approx(result.test_loss)
    rows = (live / "plots" / "metrics" / "test" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["2"]
    rows = (live / "plots" / "metrics" / "val" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["1", "2"]
    # The confusion matrix is the test split's (359 images), not val's.
    matrix = json.loads((live / "plots" / "sklearn" / "confusion_matrix.json").read_text())
    assert len(matrix) == 359

    history = checkpoint.load(Path(cfg.model_checkpoint_dir_path) / "checkpoint.pt")["history"]
    assert "test/loss" not in history[0]["metrics"] and "val/loss" in history[0]["metrics"]
    assert history[-1]["metrics"]["test/loss"] == result.test_loss


def test_a_resumed_run_still_logs_test_once(cfg: TrainConfig) -> None:
    first = train(replace(cfg, epochs=1, live_dir_path=str(Path(cfg.live_dir_path) / "a")))
    resumed = train(replace(cfg, resume=True))
    assert resumed.run_id == first.run_id
    # Epoch 1 was the first run's last: it tested then; the resumed run tests after epoch 2.
    assert [s for s, _ in steps(cfg, resumed.run_id, "test/loss")] == [1, 2]
    assert [s for s, _ in steps(cfg, resumed.run_id, "val/loss")] == [1, 2]
    assert steps(cfg, resumed.run_id, "test/loss")[-1][1] == resumed.test_loss
    # The checkpoint and dvclive keep the final look only, as a straight run has it.
    history = checkpoint.load(Path(cfg.model_checkpoint_dir_path) / "checkpoint.pt")["history"]
    assert ["test/loss" in h["metrics"] for h in history] == [False, True]
    rows = (Path(cfg.live_dir_path) / "plots" / "metrics" / "test" / "loss.tsv").read_text()
    assert [r.split("\t")[0] for r in rows.splitlines()[1:]] == ["2"]


@pytest.mark.slow
def test_the_sweep_chooses_on_val_and_its_parent_reports_test(
    sample_processed: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{empty_store(tmp_path / 'mlruns' / 'mlflow.db')}"
    result = run_script(
        "train_model.py",
        "--multirun",
        f"data_dir_path={sample_processed}",
        "epochs=1",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path / 'sweep' / 'results'}",
        f"mlflow_tracking_uri={store}",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    results = tmp_path / "sweep" / "results"
    with open(results / "trials.csv", newline="") as fh:
        trials = list(csv.DictReader(fh))
    assert len(trials) == 2
    # The documented rule on val: the lowest val loss (the Pareto trial best on it).
    chosen = min(
        trials, key=lambda t: (float(t["values_val_loss"]), -float(t["values_val_accuracy"]))
    )
    best = yaml.safe_load((results / "best_params.yaml").read_text())
    assert best["trial"] == int(chosen["number"])
    assert best["values"] == {
        "val/loss": float(chosen["values_val_loss"]),
        "val/accuracy": float(chosen["values_val_accuracy"]),
    }
    assert best["test"] == {
        "test/loss": float(chosen["test_loss"]),
        "test/accuracy": float(chosen["test_accuracy"]),
    }

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("image-classification").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["best_trial"] == chosen["number"]
    trial_run = client.get_run(parent.data.tags["best_mlflow_run_id"])
    assert trial_run.data.tags["trial_number"] == chosen["number"]
    # The parent holds the chosen trial's test metrics, once each, as the trial logged them.
    assert parent.data.metrics == {
        "best/val/loss": trial_run.data.metrics["val/loss"],
        "best/val/accuracy": trial_run.data.metrics["val/accuracy"],
        "best/test/loss": trial_run.data.metrics["test/loss"],
        "best/test/accuracy": trial_run.data.metrics["test/accuracy"],
    }
    for name in parent.data.metrics:
        assert len(client.get_metric_history(parent.info.run_id, name)) == 1, name
