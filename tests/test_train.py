"""Training through the pure ``train(cfg)`` function: determinism, outputs, tracking."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import model_weights
from imgpipe import checkpoint
from imgpipe.config import TrainConfig
from imgpipe.data import load_processed
from imgpipe.errors import PipelineError
from imgpipe.testing import train_config
from imgpipe.train import train


@pytest.fixture
def cfg(tmp_path: Path, sample_processed: Path, monkeypatch: pytest.MonkeyPatch) -> TrainConfig:
    """A short run on the sample digits with every output under tmp_path."""
    monkeypatch.chdir(tmp_path)
    return train_config(sample_processed, tmp_path, epochs=3, setup_mlflow=False)


def test_same_seed_gives_identical_models_and_metrics(cfg: TrainConfig, tmp_path: Path) -> None:
    first = train(cfg).objectives
    weights = model_weights(cfg)
    again = replace(cfg, model_checkpoint_dir_path=str(tmp_path / "models2"))
    assert train(again).objectives == first
    for name, tensor in model_weights(again).items():
        assert torch.equal(tensor, weights[name]), name
    other = replace(cfg, seed=2, model_checkpoint_dir_path=str(tmp_path / "models3"))
    assert train(other).objectives != first


def test_outputs_checkpoint_and_dvclive(cfg: TrainConfig, tmp_path: Path) -> None:
    result = train(cfg)
    loss, accuracy, timings = result.test_loss, result.test_accuracy, result.timings
    assert 0.8 < accuracy <= 1.0 and loss > 0
    # MLflow off: dvclive alone, on the training thread; no start-up thread at all.
    assert 0 < timings.tracking_s < timings.total_s
    assert timings.tracking_background_cpu_s == 0

    state = checkpoint.load(tmp_path / "models" / "checkpoint.pt")
    n_train = len(load_processed(cfg.data_dir_path).train.labels)
    assert state["epoch"] == 3 and state["global_step"] == 3 * -(-n_train // cfg.train_bs)
    assert {"model", "optimizer", "scheduler", "rng", "history", "fingerprint"} <= set(state)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["history"][-1]["metrics"]["test/accuracy"] == accuracy

    summary = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert summary["test"]["accuracy"] == pytest.approx(accuracy)
    assert summary["step"] == 3
    rows = (
        (tmp_path / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    )
    assert rows[0] == "step\tloss" and [r.split("\t")[0] for r in rows[1:]] == ["1", "2", "3"]
    matrix = json.loads(
        (tmp_path / "dvclive" / "plots" / "sklearn" / "confusion_matrix.json").read_text()
    )
    assert len(matrix) == 359 and {"actual", "predicted"} <= set(matrix[0])


def test_mlflow_run_has_params_history_tags_and_model(
    cfg: TrainConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HPTUNING_TAG", "1732700000")
    result = train(replace(cfg, setup_mlflow=True, mlflow_run_name="unit"))
    accuracy, timings = result.test_accuracy, result.timings
    # What tracking cost the run is counted: the run was created on the start-up thread.
    assert 0 < timings.tracking_s < timings.total_s
    assert timings.tracking_background_cpu_s > 0

    client = MlflowClient(cfg.mlflow_tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow_exp_name).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "unit"
    assert run.data.params["lr"] == "1.0" and run.data.params["epochs"] == "3"
    assert run.data.tags["hptuning_tag"] == "1732700000"
    for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2, 3], name
    (tested,) = client.get_metric_history(run.info.run_id, "test/accuracy")  # once, at the end
    assert tested.step == 3 and tested.value == accuracy
    state = checkpoint.load(tmp_path / "models" / "checkpoint.pt")
    assert state["mlflow_run_id"] == run.info.run_id == result.run_id
    # The model is a real MLflow model that carries its preprocessing: pyfunc alone turns
    # the test split's pixels (as process_data stored them) into the classes training found.
    uri = f"runs:/{run.info.run_id}/model"
    data = load_processed(cfg.data_dir_path)
    answers = mlflow.pyfunc.load_model(uri).predict(np.asarray(data.test.images[:50]))
    assert list(answers.columns) == ["prediction", "probability", "top_k"]
    assert len(answers) == 50 and answers["probability"].between(0, 1).all()
    assert set(answers["prediction"]) <= set(data.classes)
    # Artifacts live beside the store, not in the current directory.
    assert (tmp_path / "store" / "artifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_bf16_autocast_trains_to_a_usable_model(cfg: TrainConfig, tmp_path: Path) -> None:
    """bf16=true changes the arithmetic (so the numbers differ from float32) but still learns."""
    plain = train(cfg).objectives
    loss, accuracy = train(
        replace(cfg, bf16=True, model_checkpoint_dir_path=str(tmp_path / "b"))
    ).objectives
    assert (loss, accuracy) != plain
    assert accuracy > 0.8


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_weights(cfg: TrainConfig, tmp_path: Path) -> None:
    """compile=true trains through torch.compile; the checkpoint holds the plain module's keys,
    so it loads into an uncompiled model and resumes like any other."""
    accuracy = train(replace(cfg, compile=True, epochs=2)).test_accuracy
    assert accuracy > 0.8
    weights = model_weights(cfg)
    assert not any(name.startswith("_orig_mod") for name in weights)
    resumed = train(replace(cfg, compile=False, epochs=3, resume=True))
    assert resumed.test_accuracy > 0.8


def test_a_named_device_that_is_missing_stops_before_any_work(
    cfg: TrainConfig, tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(PipelineError, match=r"device=cuda but torch .* sees no GPU"):
        train(replace(cfg, device="cuda"))
    assert not (tmp_path / "models").exists()
