"""The training job as one function: config -> data -> model -> epochs -> (loss, accuracy)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgpipe import checkpoint
from imgpipe.config import TrainConfig
from imgpipe.data import ProcessedData, load_processed
from imgpipe.engine import TensorSplit, evaluate, train_one_epoch
from imgpipe.errors import PipelineError
from imgpipe.model import MODEL_NAME, ConvNet
from imgpipe.tracking import (
    Tracker,
    check_tracking_uri,
    redact_url,
    resolve_tracking_uri,
    run_tags,
)

log = logging.getLogger(__name__)

METRIC_NAMES = ("train/loss", "train/accuracy", "test/loss", "test/accuracy")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(device: str, no_cuda: bool = False, no_mps: bool = False) -> torch.device:
    """``auto``: CUDA, then MPS, then the CPU; a named device must be there."""
    if device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise PipelineError(
            f"device=cuda but torch {torch.__version__} ({build}) sees no GPU: check the driver "
            "(nvidia-smi) and, in a container, the GPU flags (make ... GPU=nvidia)"
        )
    if device == "mps" and not _mps_available():
        raise PipelineError(f"device=mps but torch {torch.__version__} sees no Apple GPU")
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available() and not no_cuda:
        return torch.device("cuda")
    if not no_mps and _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG; return the generator that orders the training batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def shape_hash(data: ProcessedData) -> str:
    """What a checkpoint's weights depend on: architecture, input shape, classes, normalisation."""
    key = {
        "model": MODEL_NAME,
        "image_shape": list(data.image_shape),
        "classes": data.classes,
        "mean": list(data.mean),
        "std": list(data.std),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def loggable_params(cfg: TrainConfig) -> dict[str, Any]:
    """The config as MLflow params, with any URL password redacted."""
    params = asdict(cfg)
    if params.get("mlflow_tracking_uri"):
        params["mlflow_tracking_uri"] = redact_url(params["mlflow_tracking_uri"])
    return params


@dataclass
class Progress:
    """Where training stands: what a checkpoint restores."""

    next_epoch: int = 1
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite: no later epoch can recover."""


def train(
    cfg: TrainConfig,
    *,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    on_run: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[float, float]:
    """Train the CNN described by ``cfg``; return the final (test loss, test accuracy).

    ``parent_run_id`` nests the MLflow run under a sweep's parent run;
    ``on_run`` receives the MLflow run id as soon as the run exists; ``timings``,
    when given, receives the seconds spent fitting, in whole epochs (fit, evaluation,
    tracking, checkpoint), in the whole call, and in tracking (MLflow and dvclive calls on
    this thread; CPU of the thread that creates the MLflow run).
    """
    started = time.perf_counter()
    tracking_uri = resolve_tracking_uri(cfg.mlflow_tracking_uri) if cfg.setup_mlflow else None
    if tracking_uri:
        check_tracking_uri(tracking_uri)  # before any data is read: fail in seconds, not minutes
    device = pick_device(cfg.device, cfg.no_cuda, cfg.no_mps)
    data = load_processed(cfg.data_dir_path)
    ckpt_dir = Path(cfg.model_checkpoint_dir_path)
    fingerprint = shape_hash(data)

    generator = seed_everything(cfg.seed)
    channels, height, width = data.image_shape
    model = ConvNet(channels, height, width, len(data.classes)).to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=cfg.gamma)
    progress = Progress()
    if cfg.resume:
        progress = restore(ckpt_dir, fingerprint, cfg, model, optimizer, scheduler, generator)
    # The compiled module shares the model's parameters: training goes through it, while
    # checkpoints and the exported model use the plain module (no "_orig_mod." keys).
    net = torch.compile(model) if cfg.compile else model

    train_split = TensorSplit(data.train.images, data.train.labels, data.mean, data.std, device)
    test_split = TensorSplit(data.test.images, data.test.labels, data.mean, data.std, device)
    log.info(
        "training on %s: %d train / %d test images, %d classes, %dx%dx%d, epochs %d..%d",
        device,
        len(train_split),
        len(test_split),
        len(data.classes),
        channels,
        height,
        width,
        progress.next_epoch,
        cfg.epochs,
    )
    resumed = progress.run_id is not None or progress.next_epoch > 1
    with Tracker(
        mlflow_enabled=cfg.setup_mlflow,
        tracking_uri=tracking_uri,
        experiment_name=cfg.mlflow_exp_name,
        run_name=cfg.mlflow_run_name,
        live_dir=cfg.live_dir_path,
        tags=run_tags() | (extra_tags or {}),
        parent_run_id=parent_run_id,
        autolog=cfg.mlflow_autolog,
        system_metrics=cfg.mlflow_system_metrics,
        resume_run_id=progress.run_id if cfg.setup_mlflow else None,
        metric_names=METRIC_NAMES,
        params=loggable_params(cfg) | {"device": str(device), "model": MODEL_NAME},
        dicts={"metadata.json": _describe(data)},
    ) as tracker:
        if resumed:
            tracker.replay(progress.history)
        metrics: dict[str, float] = (
            dict(progress.history[-1]["metrics"]) if progress.history else {}
        )

        def snapshot(epoch: int, keep: bool = False) -> dict[str, Any]:
            """The full training state; ``keep`` copies it to be saved later."""
            own = copy.deepcopy if keep else (lambda state: state)
            return {
                "format": checkpoint.FORMAT,
                "epoch": epoch,
                "global_step": progress.global_step,
                "model": own(model.state_dict()),
                "optimizer": own(optimizer.state_dict()),
                "scheduler": own(scheduler.state_dict()),
                "rng": checkpoint.capture_rng(generator),
                "history": list(progress.history),
                "config_hash": fingerprint,
                "config": loggable_params(cfg),
            }

        def save(state: dict[str, Any]) -> None:
            state["mlflow_run_id"] = tracker.run_id
            # A fresh run drops the old run's checkpoints only with its own first one.
            checkpoint.save_checkpoint(state, ckpt_dir, keep_previous=resumed or state["epoch"] > 0)

        # The MLflow run is being created on a background thread while the first epoch
        # trains; epoch 0 (the initial state) is saved with the run id once it exists,
        # so a kill in the first epoch resumes into the same run.
        initial = None if resumed else snapshot(0, keep=True)

        def first_epoch_done() -> None:
            run_id = tracker.wait()
            if initial is not None:
                save(initial)
            if run_id and on_run is not None:
                on_run(run_id)
            if resumed:
                tracker.set_tags(
                    {"resumed_at_epoch": str(progress.next_epoch), "epochs_total": str(cfg.epochs)}
                )

        predicted = None
        epochs_s = fit_s = 0.0
        for epoch in range(progress.next_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            if epoch == progress.next_epoch:
                log.info(
                    "first training step %.2fs after the process started", _since_process_start()
                )
            fit = train_one_epoch(
                net,
                optimizer,
                train_split,
                cfg.train_bs,
                generator,
                epoch,
                cfg.log_interval,
                bf16=cfg.bf16,
            )
            t_fit = time.perf_counter() - t0
            if not math.isfinite(fit.loss):
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch}: loss {fit.loss} (lr={cfg.lr}); "
                    "lower lr or check the data"
                )
            scheduler.step()
            score, predicted = evaluate(net, test_split, cfg.test_bs, cfg.bf16)
            progress.global_step += -(-len(train_split) // cfg.train_bs)
            metrics = {
                "train/loss": fit.loss,
                "train/accuracy": fit.accuracy,
                "test/loss": score.loss,
                "test/accuracy": score.accuracy,
            }
            fit_s += t_fit
            if epoch == progress.next_epoch:
                first_epoch_done()
            tracker.log_epoch(epoch, metrics)
            progress.history.append({"epoch": epoch, "metrics": metrics})
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  (%.2fs)",
                epoch,
                cfg.epochs,
                fit.loss,
                fit.accuracy,
                score.loss,
                score.accuracy,
                time.perf_counter() - t0,
            )
            if epoch % cfg.model_checkpoint_interval == 0 or epoch == cfg.epochs:
                save(snapshot(epoch))
            epochs_s += time.perf_counter() - t0

        if predicted is None:  # resumed a run that had already reached `epochs`
            _, predicted = evaluate(net, test_split, cfg.test_bs, cfg.bf16)
        checkpoint.save_atomic(
            {
                "model_name": MODEL_NAME,
                "state_dict": model.state_dict(),
                "classes": data.classes,
                "image_shape": list(data.image_shape),
                "mean": list(data.mean),
                "std": list(data.std),
            },
            ckpt_dir / checkpoint.MODEL_FILE,
        )
        tracker.log_confusion_matrix(
            [data.classes[i] for i in test_split.labels.tolist()],
            [data.classes[i] for i in predicted.tolist()],
        )
        example, _ = test_split.batch(slice(0, 2))
        tracker.log_model(model, example.cpu())
    total_s = time.perf_counter() - started
    if timings is not None:
        timings.update(
            fit_s=fit_s,
            epochs_s=epochs_s,
            total_s=total_s,
            tracking_s=tracker.blocking_s,
            tracking_background_cpu_s=tracker.background_cpu_s,
        )
    log.info(
        "done in %.1fs (tracking: %.2fs on the training thread, %.2fs CPU in the background): "
        "test loss %.4f, test accuracy %.4f",
        total_s,
        tracker.blocking_s,
        tracker.background_cpu_s,
        metrics["test/loss"],
        metrics["test/accuracy"],
    )
    return metrics["test/loss"], metrics["test/accuracy"]


# Keys whose change on resume means the continued run differs from a straight one.
TRAJECTORY_KEYS = ("lr", "gamma", "train_bs", "seed")


def restore(
    ckpt_dir: Path,
    fingerprint: str,
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> Progress:
    """Load the newest valid checkpoint into the training objects (resume=true)."""
    checkpoint.remove_stale_temps(ckpt_dir)
    found = checkpoint.load_latest(ckpt_dir)
    if found is None:
        log.warning("resume=true but no checkpoint in %s: starting fresh", ckpt_dir)
        return Progress()
    state, path = found
    if state["config_hash"] != fingerprint:
        raise PipelineError(
            f"{path}: checkpoint was trained for a different model or data "
            "(architecture, image shape, classes or normalisation); set resume=false to start fresh"
        )
    changed = [k for k in TRAJECTORY_KEYS if state.get("config", {}).get(k) != getattr(cfg, k)]
    if changed:
        log.warning(
            "resuming with %s changed since the checkpoint; optimizer and scheduler state "
            "continue from the checkpoint",
            ", ".join(f"{k}={getattr(cfg, k)} (was {state['config'].get(k)})" for k in changed),
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    checkpoint.restore_rng(state["rng"], generator)
    log.info(
        "resuming after epoch %d from %s (MLflow run %s)",
        state["epoch"],
        path,
        state["mlflow_run_id"],
    )
    return Progress(
        next_epoch=state["epoch"] + 1,
        global_step=state["global_step"],
        history=list(state["history"]),
        run_id=state["mlflow_run_id"],
    )


def _since_process_start() -> float:
    """Seconds since this process began (interpreter start-up and imports included)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except ImportError:  # psutil comes with mlflow; without it, report from import time
        return time.perf_counter()


def _describe(data: ProcessedData) -> dict[str, Any]:
    return {
        "classes": data.classes,
        "image_shape": list(data.image_shape),
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "train_count": len(data.train.labels),
        "test_count": len(data.test.labels),
    }
