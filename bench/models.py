"""Models and augmentation: what augmenting costs, and a timm model's epoch through the
stage against a bare loop. Writes the "Models and augmentation" section of RESULTS.md.

    python -m bench models              # 512 RGB images 64x64, 3 rounds
    python -m bench models --smoke      # 64 images 32x32, 1 round: every row, no section

Rows:
- the augmenter's cost per batch (64 images, CPU, median of 20 calls after a warm-up), for
  ``basic`` (random resized crop + flip) and ``strong`` (+ colour jitter, erasing);
- training samples/s through the stage (``train()``, fit time only) with ``augment=basic``
  against ``augment=none``, same model, data, seed and batch (target >= 0.9x), for the seed
  CNN and a timm architecture;
- a timm model's epoch through the stage against ``bench.baselines.bare_training`` (float
  tensors in memory, randperm, forward/backward/step, no evaluation) on the same arrays
  with the same optimizer (Adadelta) and batch (target >= 0.95x).
The stage and the baseline run alternately in one process; each side keeps its best round
(a shared machine's noise only ever slows a run down).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import baselines
from bench.sections import BENCH, write_section
from imgpipe.augment import Augmenter, settings
from imgpipe.data import load_processed, process_dataset
from imgpipe.models import build_model, spec_for
from imgpipe.testing import train_config

TOPIC = "models"
TITLE = "Models and augmentation"
TIMM = "tf_efficientnet_lite0"
BATCH = 64


def write_photos(root: Path, count: int, size: int) -> Path:
    """``count`` RGB images of four tinted, noisy classes (the cost does not depend on
    what the pixels show), processed as process_data does."""
    rng = np.random.default_rng(0)
    for i in range(count):
        label = f"c{i % 4}"
        folder = root / "raw" / ("train" if i % 8 else "test") / label
        folder.mkdir(parents=True, exist_ok=True)
        tint = np.array([(i % 4) * 60, 255 - (i % 4) * 60, 128])
        pixels = np.clip(tint + rng.integers(-80, 80, (size, size, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:05d}.png")
    process_dataset(root / "raw", root / "processed", num_workers=1)
    return root / "processed"


def augment_ms(preset: str, size: int, calls: int) -> float:
    """Milliseconds per batch of ``BATCH`` normalised images for ``preset``."""
    aug = Augmenter(settings(preset), (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), 1)
    x = torch.randn(BATCH, 3, size, size)
    aug(x)  # warm-up
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        aug(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def stage_sps(data: Path, root: Path, model: str, augment: str, epochs: int) -> float:
    """Training samples/s through ``train()`` (its fit time: no evaluation, no tracking)."""
    from imgpipe.train import train

    cfg = train_config(
        data,
        root,
        model=model,
        augment=augment,
        epochs=epochs,
        train_bs=BATCH,
        lr=0.1,
        setup_mlflow=False,
        live_images=False,
    )
    timings = train(cfg).timings
    return len(load_processed(data).train.labels) * epochs / timings.fit_s


def bare_sps(data: Path, model: str, epochs: int) -> float:
    d = load_processed(data)
    torch.manual_seed(0)
    net = build_model(spec_for(d, model))
    return baselines.bare_training(d.train.images, d.train.labels, net, BATCH, epochs, lr=0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, no section")
    parser.add_argument("--out", type=Path, default=BENCH, help="where RESULTS.md is")
    args = parser.parse_args(argv)
    count, size, rounds = (64, 32, 1) if args.smoke else (512, 64, args.rounds)
    epochs = 1 if args.smoke else args.epochs
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-models-") as tmp:
        work = Path(tmp)
        data = write_photos(work, count, size)
        cwd = os.getcwd()
        os.chdir(work)  # train() writes its logs relative to here
        try:
            aug = {p: augment_ms(p, size, 3 if args.smoke else 20) for p in ("basic", "strong")}
            runs: dict[str, list[float]] = {}
            for model in ("convnet", TIMM):  # warm-up: kernels, allocator, timm's registry
                stage_sps(data, work / f"warm-{model}", model, "basic", 1)
            for i in range(rounds):
                for model in ("convnet", TIMM):
                    for augment in ("none", "basic"):
                        sps = stage_sps(
                            data, work / f"{model}-{augment}-{i}", model, augment, epochs
                        )
                        runs.setdefault(f"{model}/{augment}", []).append(sps)
                runs.setdefault("bare", []).append(bare_sps(data, TIMM, epochs))
                runs.setdefault("stage", []).append(
                    stage_sps(data, work / f"stage-{i}", TIMM, "none", epochs)
                )
        finally:
            os.chdir(cwd)
    best = {key: max(values) for key, values in runs.items()}
    ratio = {m: best[f"{m}/basic"] / best[f"{m}/none"] for m in ("convnet", TIMM)}
    stage_ratio = best["stage"] / best["bare"]
    rows = [
        (
            f"augment=basic, per batch of {BATCH} ({size}x{size} RGB)",
            f"{aug['basic']:.1f} ms",
            "",
            "measured",
        ),
        (f"augment=strong, per batch of {BATCH}", f"{aug['strong']:.1f} ms", "", "measured"),
    ]
    for model in ("convnet", TIMM):
        none_sps, basic_sps = best[f"{model}/none"], best[f"{model}/basic"]
        rows.append(
            (
                f"{model}: samples/s augment=basic / none ({basic_sps:.0f} / {none_sps:.0f})",
                f"{ratio[model]:.2f}x",
                ">= 0.9x",
                "met" if ratio[model] >= 0.9 else "not met",
            )
        )
    rows.append(
        (
            f"{TIMM} epoch: stage / bare loop ({best['stage']:.0f} / {best['bare']:.0f} samples/s)",
            f"{stage_ratio:.2f}x",
            ">= 0.95x",
            "met" if stage_ratio >= 0.95 else "not met",
        )
    )
    for row in rows:
        print(" | ".join(row))
    load = os.getloadavg()[0]
    intro = (
        f"{count} RGB images {size}x{size} (synthetic: cost does not depend on content), "
        f"batch {BATCH}, {epochs} epochs per run, best of {rounds} alternated rounds, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at the end (other jobs were "
        "running: ratios hold better than absolute numbers). Samples/s are the stage's "
        "fit time only (train_one_epoch), evaluation and tracking excluded."
    )
    data = {"runs": runs, "augment_ms": aug}
    # Smoke numbers never overwrite the report: they go to smoke.md beside their JSON.
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / ("smoke.md" if args.smoke else "RESULTS.md")
    write_section(TOPIC, TITLE, intro, rows, data, target)
    return 0
