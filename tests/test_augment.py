"""Augmentation: a different draw for every image, from the run's seed and rank, resumed
with the checkpoint (bit for bit after SIGKILL), on every DDP rank its own; evaluation
never augments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_same_weights, write_dataset
from imgpipe import checkpoint
from imgpipe.augment import PRESETS, Augmenter, settings
from imgpipe.config import TrainConfig
from imgpipe.data import load_processed, process_dataset
from imgpipe.engine import TensorSplit, evaluate, nll_loss
from imgpipe.models import load_model_file
from imgpipe.testing import REPO, run_outputs, train_config
from imgpipe.train import train

CPU = torch.device("cpu")
TIMM = "test_efficientnet"  # a real timm architecture, small enough for a test


def batch(n: int = 6, channels: int = 3, size: int = 12) -> torch.Tensor:
    """``n`` copies of one normalised image (any difference afterwards is the augmenter's)."""
    one = torch.linspace(-1, 1, channels * size * size).view(1, channels, size, size)
    return one.repeat(n, 1, 1, 1)


def augmenter(preset: str = "basic", seed: int = 1, rank: int = 0, **over) -> Augmenter:
    return Augmenter(settings(preset, **over), (0.5,) * 3, (0.25,) * 3, CPU, seed, rank)


# --------------------------------------------------------------------------- the draws


def test_every_image_gets_its_own_draw_and_a_seed_repeats_them() -> None:
    out = augmenter()(batch())
    assert out.shape == batch().shape and torch.isfinite(out).all()
    firsts = {tuple(img.flatten()[:20].tolist()) for img in out}
    assert len(firsts) == 6  # not one draw for the whole batch (torchvision v2's way)
    assert torch.equal(augmenter()(batch()), out)
    assert not torch.equal(augmenter(seed=2)(batch()), out)
    assert not torch.equal(augmenter(rank=1)(batch()), out)  # each DDP rank its own


def test_a_flip_alone_mirrors_and_a_full_crop_keeps_the_image() -> None:
    flipped = augmenter("none", flip=1.0)(batch())
    assert torch.equal(flipped, batch().flip(-1))
    kept = augmenter(crop_scale=[1.0, 1.0], flip=0.0)
    # other aspect ratios still crop: a full-area crop of ratio 1 is the identity
    torch.manual_seed(0)
    x = torch.rand(4, 3, 12, 12)
    u = torch.zeros(4, 13)
    u[:, 1] = 0.5  # log-ratio midway: ratio 1
    u[:, 2:4] = 0.5  # centred
    u[:, 4] = 0.9  # no flip
    torch.testing.assert_close(kept._crop_and_flip(x, u), x)


def test_strong_jitters_colours_and_erases_to_the_mean() -> None:
    out = augmenter("strong", erase=1.0, crop_scale=[1.0, 1.0], flip=0.0)(batch(8))
    assert torch.isfinite(out).all()
    # the erased rectangle holds the mean: exactly 0 once normalised
    assert all((img == 0).all(dim=0).sum() > 0 for img in out)


def test_the_generator_state_continues_the_same_draws() -> None:
    first = augmenter()
    first(batch())
    saved = first.state()
    expected = first(batch())
    again = augmenter()
    again.set_state(saved)
    assert torch.equal(again(batch()), expected)


def test_presets_and_overrides() -> None:
    assert not PRESETS["none"].active
    assert settings("basic").crop_scale is not None and settings("basic").jitter == 0
    assert settings("strong", jitter=0.1, erase=0.0).jitter == 0.1
    assert settings("none", flip=0.5).active  # a setting switches its step on


def test_label_smoothing_is_cross_entropys() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    logp = F.log_softmax(logits, dim=1)
    ours = nll_loss(logp, target, 0.1)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, label_smoothing=0.1))
    summed = nll_loss(logp, target, 0.1, reduction="sum")
    torch.testing.assert_close(summed, ours * 5)
    assert torch.equal(nll_loss(logp, target, 0.0), F.nll_loss(logp, target))


# --------------------------------------------------------------------------- in training


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 16x16 RGB images, tinted by class, with noise: a few dozen files."""
    rng = np.random.default_rng(5)
    tints = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}

    def items(n: int) -> list[tuple[str, np.ndarray]]:
        out = []
        for i in range(n):
            label = list(tints)[i % 3]
            noise = rng.integers(-60, 60, (16, 16, 3))
            out.append((label, np.clip(np.array(tints[label]) + noise, 0, 255).astype(np.uint8)))
        return out

    root = tmp_path_factory.mktemp("colour")
    write_dataset(root / "raw", {"train": items(48), "test": items(12)})
    process_dataset(root / "raw", root / "processed", num_workers=1, val_fraction=0.25)
    return root / "processed"


def timm_cfg(data: Path, root: Path, **changes: object) -> TrainConfig:
    values = {
        "model": TIMM,
        "augment": "basic",
        "optimizer": "sgd",
        "lr": 0.05,
        "train_bs": 8,
        "epochs": 4,
        "setup_mlflow": False,
        "live_images": False,
    }
    return train_config(data, root, **(values | changes))


def test_evaluation_never_augments(colour_data: Path, tmp_path: Path) -> None:
    cfg = timm_cfg(colour_data, tmp_path, augment="strong", epochs=1)
    result = train(cfg)
    model, spec = load_model_file(Path(cfg.model_checkpoint_dir_path) / "model.pt")
    data = load_processed(colour_data)
    val = TensorSplit(data.val.images, data.val.labels, spec.mean, spec.std, CPU)
    score, _ = evaluate(model, val, 1000)
    assert score.loss == result.val_loss and score.accuracy == result.val_accuracy


def start(cfg: TrainConfig, *extra: str) -> subprocess.Popen:
    args = {
        "data_dir_path": cfg.data_dir_path,
        "model": cfg.model,
        "augment": cfg.augment,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "train_bs": cfg.train_bs,
        "epochs": cfg.epochs,
        "setup_mlflow": "false",
        "live_images": "false",
        **run_outputs(Path(cfg.model_checkpoint_dir_path).parent),
    }
    cmd = [sys.executable, "-u", str(REPO / "src" / "train_model.py")]
    cmd += [f"{k}={v}" for k, v in args.items()] + list(extra)
    return subprocess.Popen(
        cmd, cwd=Path(cfg.model_checkpoint_dir_path).parent, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_a_timm_model_with_augmentation_resumes_bit_for_bit_after_sigkill(
    colour_data: Path, tmp_path: Path
) -> None:
    straight = timm_cfg(colour_data, tmp_path / "straight")
    (tmp_path / "straight").mkdir()
    proc = start(straight)
    assert proc.wait(600) == 0, proc.stderr.read()

    killed = timm_cfg(colour_data, tmp_path / "killed")
    (tmp_path / "killed").mkdir()
    proc = start(killed)
    first = Path(killed.model_checkpoint_dir_path) / checkpoint.CHECKPOINT_FILE
    deadline = time.monotonic() + 600
    # killed in the middle of a later epoch: after epoch 1's checkpoint, before the end
    while time.monotonic() < deadline and proc.poll() is None:
        if first.exists() and checkpoint.load(first)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    state = checkpoint.load(first)
    assert 1 <= state["epoch"] < killed.epochs and "augment" in state["rng"]
    resumed = start(killed, "resume=true")
    assert resumed.wait(600) == 0, resumed.stderr.read()
    assert_same_weights(killed, straight)


@pytest.mark.slow
def test_two_processes_train_with_augmentation_each_rank_drawing_its_own(
    colour_data: Path, tmp_path: Path
) -> None:
    cfg = timm_cfg(colour_data, tmp_path, epochs=2)
    args = [
        f"{k}={v}"
        for k, v in {
            "data_dir_path": colour_data,
            "model": TIMM,
            "augment": "basic",
            "optimizer": "sgd",
            "lr": 0.05,
            "train_bs": 8,
            "epochs": 2,
            "nproc_per_node": 2,
            "setup_mlflow": "false",
            "live_images": "false",
            **run_outputs(tmp_path),
        }.items()
    ]
    cmd = [sys.executable, "-m", "imgpipe.distributed", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*cmd, str(REPO / "src" / "train_model.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    state = checkpoint.load(Path(cfg.model_checkpoint_dir_path) / checkpoint.CHECKPOINT_FILE)
    assert state["epoch"] == 2 and state["world_size"] == 2
    draws = [rng["augment"] for rng in state["rank_rngs"]]
    assert len(draws) == 2 and not torch.equal(draws[0], draws[1])
    history = state["history"]
    assert all(np.isfinite(h["metrics"]["train/loss"]) for h in history)
