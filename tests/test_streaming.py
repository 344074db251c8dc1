"""Streaming training: splits over the memory budget are read from their files while training,
with the same numbers as in memory, resumable, stoppable, and failing in one clear line."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_same_weights
from imgpipe.config import TrainConfig
from imgpipe.data import ProcessedData, Split, load_processed
from imgpipe.engine import TensorSplit, evaluate, train_one_epoch
from imgpipe.errors import PipelineError
from imgpipe.models import build_trainable, spec_for
from imgpipe.rng import seed_everything
from imgpipe.streaming import StreamingSplit, open_splits
from imgpipe.testing import run_outputs, train_config
from imgpipe.train import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def in_memory(sample_processed: Path, tmp_path_factory: pytest.TempPathFactory):
    """A straight 2-epoch run with everything in memory: what streaming must reproduce."""
    root = tmp_path_factory.mktemp("in-memory")
    cfg = train_config(sample_processed, root, epochs=2, setup_mlflow=False)
    return cfg, train(cfg)


def streamed(cfg: TrainConfig, root: Path, **changes: object) -> TrainConfig:
    # memory_budget_mb=0: nothing fits, every split is streamed from its file.
    return replace(cfg, **run_outputs(root), memory_budget_mb=0, **changes)


def test_streaming_trains_the_same_model_bit_for_bit(
    in_memory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, expected = in_memory
    with caplog.at_level(logging.INFO, logger="imgpipe.streaming"):
        result = train(streamed(cfg, tmp_path))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "imgpipe.streaming"]
    assert "train streamed" in line and "val streamed" in line and "test streamed" in line
    assert "budget 0 kB" in line
    assert_same_weights(streamed(cfg, tmp_path), cfg)
    assert result.objectives == expected.objectives
    assert (result.test_loss, result.test_accuracy) == (expected.test_loss, expected.test_accuracy)


def test_streaming_resume_ends_like_a_straight_run(in_memory, tmp_path: Path) -> None:
    cfg, expected = in_memory
    first = streamed(cfg, tmp_path, epochs=1)
    train(first)
    result = train(replace(first, epochs=2, resume=True))
    assert_same_weights(replace(first, epochs=2), cfg)
    assert result.objectives == expected.objectives


def test_the_budget_is_shared_by_the_splits_in_order(caplog: pytest.LogCaptureFixture) -> None:
    def split(n: int) -> Split:  # 16x16 gray: 256 bytes an image, 5x that in memory
        return Split(np.zeros((n, 16, 16, 1), np.uint8), np.zeros(n, np.int64))

    data = ProcessedData(["a"], (1, 16, 16), (0.5,), (0.25,), split(600), split(600), split(100))
    with caplog.at_level(logging.INFO, logger="imgpipe.streaming"):
        everything = open_splits(data, ("train", "val", "test"), CPU, None)
        budgeted = open_splits(data, ("train", "val", "test"), CPU, 1)
    assert all(isinstance(s, TensorSplit) for s in everything.values())
    # train takes 750 kB of the 1 MB; val (750 kB more) is streamed; test (125 kB) still fits.
    assert isinstance(budgeted["train"], TensorSplit)
    assert isinstance(budgeted["val"], StreamingSplit)
    assert isinstance(budgeted["test"], TensorSplit)
    lines = [r.getMessage() for r in caplog.records if r.name == "imgpipe.streaming"]
    assert len(lines) == 2
    assert lines[1] == (
        "data: train in memory (750 kB), val streamed from its file (750 kB in memory would "
        "not fit), test in memory (125 kB); budget 1 MB (memory_budget_mb)"
    )
    x, _ = budgeted["val"].batch(slice(0, 3))  # an array without a file is read from memory
    assert torch.equal(x, budgeted["train"].batch(slice(0, 3))[0])


@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
def test_streamed_batches_equal_in_memory_batches(tmp_path: Path, channels: int) -> None:
    path = tmp_path / "train_images.npy"
    rng = np.random.default_rng(channels)
    np.save(path, rng.integers(0, 256, (300, 5, 7, channels), dtype=np.uint8))
    images, labels = np.load(path, mmap_mode="r"), rng.integers(0, 4, 300)
    mean, std = (0.4, 0.5, 0.6)[:channels], (0.2, 0.25, 0.3)[:channels]
    memory = TensorSplit(images, labels, mean, std, CPU)
    stream = StreamingSplit(images, labels, mean, std, CPU)
    order = torch.randperm(len(memory), generator=torch.Generator().manual_seed(3))
    indices = [order[i : i + 50] for i in range(0, len(order), 50)] + [slice(10, 70)]
    for (x, y), index in zip(stream.batches(indices), indices, strict=True):
        ex, ey = memory.batch(index)
        assert torch.equal(x, ex) and torch.equal(y, ey)
        assert x.stride() == ex.stride()  # the same layout, so the same convolution path


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "imgpipe-reader"]


def test_a_stop_mid_epoch_ends_the_reader_thread(sample_processed: Path) -> None:
    data = load_processed(sample_processed)
    stream = StreamingSplit(data.train.images, data.train.labels, data.mean, data.std, CPU)
    parts = build_trainable(spec_for(data), lr=1.0, gamma=0.7, device=CPU)
    asked = iter(range(1000))
    started = time.monotonic()
    fit = train_one_epoch(
        parts.model,
        parts.optimizer,
        stream,
        batch_size=8,  # many batches: the reader is mid-epoch, blocked on a full queue
        generator=seed_everything(1),
        epoch=1,
        log_interval=10,
        should_stop=lambda: next(asked) >= 3,
    )
    assert fit is None
    assert time.monotonic() - started < 30  # a hang would never return; this is no speed check
    deadline = time.monotonic() + 5
    while reader_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader_threads() == []


def test_a_truncated_file_fails_in_one_line_naming_it(
    sample_processed: Path, tmp_path: Path
) -> None:
    data = load_processed(sample_processed)
    path = tmp_path / "train_images.npy"
    np.save(path, np.asarray(data.train.images))
    images = np.load(path, mmap_mode="r")
    stream = StreamingSplit(images, data.train.labels, data.mean, data.std, CPU)
    with open(path, "r+b") as fh:  # the file loses its second half after training began
        fh.truncate(path.stat().st_size // 2)
    parts = build_trainable(spec_for(data), lr=1.0, gamma=0.7, device=CPU)
    with pytest.raises(PipelineError, match=rf"^{path}: file ended early .* re-run process_data$"):
        evaluate(parts.model, stream, batch_size=100)
    deadline = time.monotonic() + 5
    while reader_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader_threads() == []


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(PipelineError, match="config key 'memory_budget_mb': -1 is invalid"):
        TrainConfig(memory_budget_mb=-1)
