"""The training job as one story: config -> data -> model -> for each epoch: fit,
evaluate, track, checkpoint -> result.

Where to change what: the model, optimizer and schedule in ``model.build_trainable``;
one epoch's arithmetic in ``engine``; what a checkpoint holds in ``checkpoint``; what
is tracked where in ``tracking``; which keys change a result in ``config``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from imgpipe import checkpoint, distributed, progress, runlock, stop
from imgpipe.checkpoint import TrainingState
from imgpipe.config import TRAJECTORY, TrainConfig, result_keys
from imgpipe.data.processed import ProcessedData, load_processed
from imgpipe.distributed import Group
from imgpipe.engine import (
    EpochResult,
    TensorSplit,
    evaluate,
    pick_device,
    train_one_epoch,
)
from imgpipe.errors import PipelineError
from imgpipe.model import MODEL_NAME, Trainable, build_trainable
from imgpipe.redact import redact_url
from imgpipe.rng import seed_everything
from imgpipe.streaming import open_splits
from imgpipe.tracking import (
    RunSpec,
    SilentTracker,
    Tracker,
    check_tracking_uri,
    resolve_tracking_uri,
    run_tags,
)

log = logging.getLogger(__name__)

# Logged every epoch; the test split is evaluated once, after the last epoch (its metrics
# are logged at that step): model selection (a sweep) looks at val only, so test stays unbiased.
METRIC_NAMES = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
TEST_METRIC_NAMES = ("test/loss", "test/accuracy")


@dataclass(frozen=True)
class Timings:
    """Seconds spent fitting, in whole epochs (fit, evaluation, tracking, checkpoint), in
    the whole call, in tracking (see ``tracking.cost``), and from process start to the
    first training step."""

    fit_s: float
    epochs_s: float
    total_s: float
    tracking_s: float
    tracking_background_cpu_s: float
    first_step_s: float


@dataclass(frozen=True)
class TrainResult:
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    test_loss: float
    test_accuracy: float
    run_id: str | None
    timings: Timings

    @classmethod
    def of(cls, metrics: dict[str, float], run_id: str | None, timings: Timings) -> TrainResult:
        return cls(
            metrics["train/loss"],
            metrics["train/accuracy"],
            metrics["val/loss"],
            metrics["val/accuracy"],
            metrics["test/loss"],
            metrics["test/accuracy"],
            run_id,
            timings,
        )

    @property
    def objectives(self) -> tuple[float, float]:
        """What a sweep optimises: (val loss, val accuracy); never test, which is reported."""
        return self.val_loss, self.val_accuracy


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite: no later epoch can recover."""

    def __init__(self, message: str, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


def train(
    cfg: TrainConfig, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None
) -> TrainResult:
    """Train the CNN described by ``cfg``. ``parent_run_id`` nests the MLflow run under a
    sweep's parent run; ``tags`` are added to the run's own. Started by torchrun, this
    process is one rank of a group (``imgpipe.distributed``)."""
    group = distributed.Group.from_env()
    distributed.quiet_other_ranks(group)
    distributed.check_world(cfg.nproc_per_node * cfg.nnodes, group)
    # One live training per checkpoint folder: a second one stops here, naming the holder
    # (rank 0 holds it for its group).
    ckpt = cfg.model_checkpoint_dir_path
    held = runlock.lock(ckpt) if group.main else contextlib.nullcontext()
    with distributed.session(group), held:
        return _train(cfg, parent_run_id, tags, group)


def _train(
    cfg: TrainConfig, parent_run_id: str | None, tags: dict[str, str] | None, group: Group
) -> TrainResult:
    started = time.perf_counter()
    tracking_uri = resolve_tracking_uri(cfg.mlflow_tracking_uri) if cfg.setup_mlflow else None
    if tracking_uri:
        check_tracking_uri(tracking_uri)  # before any data is read: fail in seconds, not minutes

    # data
    device = distributed.start(group, pick_device(cfg.device, cfg.no_cuda, cfg.no_mps))
    data = load_processed(cfg.data_dir_path)
    # In memory while the budget lasts, else streamed from the files: the same numbers.
    splits = open_splits(data, ("train", "val", "test"), device, cfg.memory_budget_mb)
    train_split, val_split, test_split = splits["train"], splits["val"], splits["test"]

    # model, optimizer, schedule; continued from the checkpoint on resume
    generator = seed_everything(cfg.seed)
    parts = build_trainable(
        data.image_shape, len(data.classes), lr=cfg.lr, gamma=cfg.gamma, device=device
    )
    distributed.seed_rank(cfg.seed, group)  # dropout: each rank its own masks
    ckpt_dir = Path(cfg.model_checkpoint_dir_path)
    state = fresh_state(parts, generator, data, cfg)
    resumed = False
    # A group that torchrun restarted (--max-restarts) continues its checkpoint.
    wanted = cfg.resume or distributed.restarted()
    if wanted and (found := restore(ckpt_dir, state.fingerprint, cfg, parts, generator, group)):
        state, resumed = found, True
    # The compiled module shares the model's parameters: training goes through it, while
    # checkpoints and the exported model use the plain module (no "_orig_mod." keys).
    net = torch.compile(parts.model) if cfg.compile else parts.model
    # Several processes: DDP averages the gradients; each takes its share of every batch.
    trained = distributed.wrap(net, group, device)
    share = {"rank": group.rank, "world": group.world}
    first_epoch = state.epoch + 1
    log_start(device, data, first_epoch, cfg.epochs)

    spec = run_spec(cfg, tracking_uri, device, data, state.run_id, parent_run_id, tags)
    # Rank 0 alone talks to the world: MLflow, dvclive, checkpoints, the model.
    tracker = (
        Tracker(cfg.live_dir_path, spec, images=cfg.live_images)
        if group.main
        else SilentTracker()
    )
    with tracker:
        if resumed:
            tracker.replay(state.history)
        # Epoch 0 (the initial state) is saved once the MLflow run exists, with its id,
        # so a kill in the first epoch resumes into the same run.
        initial = None if resumed else state
        metrics = dict(state.history[-1]["metrics"]) if state.history else {}
        first_step_s = fit_s = epochs_s = 0.0
        predicted = None
        for epoch in range(first_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            if epoch == first_epoch:
                first_step_s = since_process_start()
                log.info("first training step %.2fs after the process started", first_step_s)
            with progress.epoch_bar(epoch, cfg.epochs, show=group.main) as bar:
                fit = train_one_epoch(
                    trained,
                    parts.optimizer,
                    train_split,
                    cfg.train_bs,
                    generator,
                    epoch,
                    cfg.log_interval,
                    bf16=cfg.bf16,
                    should_stop=distributed.agreed(stop.requested, group),
                    on_progress=bar.update,
                    **share,
                )
            if fit is None:  # SIGTERM/SIGINT: this epoch is dropped, the last checkpoint stands
                raise stop.stopped(f" after epoch {epoch - 1}: resume with resume=true")
            fit_s += time.perf_counter() - t0
            check_finite(fit, epoch, cfg.lr, tracker.run_id)
            parts.scheduler.step()
            score, _ = evaluate(net, val_split, cfg.test_bs, cfg.bf16, **share)
            metrics = epoch_metrics(fit, score)
            if epoch == cfg.epochs:  # the one look at test, logged with the last epoch
                tested, predicted = evaluate(net, test_split, cfg.test_bs, cfg.bf16, **share)
                metrics |= final_metrics(tested)
            if epoch == first_epoch:
                on_first_epoch(tracker, initial, ckpt_dir, cfg, first_epoch, resumed, group)
            tracker.log_epoch(epoch, metrics)
            state.history.append({"epoch": epoch, "metrics": metrics})
            log_epoch_line(epoch, cfg.epochs, metrics, time.perf_counter() - t0)
            if epoch % cfg.model_checkpoint_interval == 0 or epoch == cfg.epochs:
                save_state(
                    parts, generator, state, epoch, len(train_split), cfg, tracker.run_id, group
                )
            epochs_s += time.perf_counter() - t0

        # the trained model
        if predicted is None:  # resumed a run that had already reached `epochs`
            tested, predicted = evaluate(net, test_split, cfg.test_bs, cfg.bf16, **share)
            metrics |= final_metrics(tested)  # as logged then: the same weights
        if group.main:
            publish_model(tracker, parts.model, data, test_split, predicted, ckpt_dir)

    timings = Timings(
        fit_s, epochs_s, time.perf_counter() - started, tracker.blocking_s,
        tracker.background_cpu_s, first_step_s,
    )  # fmt: skip
    log_done(timings, metrics)
    return TrainResult.of(metrics, tracker.run_id, timings)


# --------------------------------------------------------------------------- the story's steps


def loggable_params(cfg: TrainConfig) -> dict[str, Any]:
    """The config as MLflow params, with any URL password redacted."""
    params = asdict(cfg)
    if params.get("mlflow_tracking_uri"):
        params["mlflow_tracking_uri"] = redact_url(params["mlflow_tracking_uri"])
    return params


def model_fingerprint(data: ProcessedData) -> str:
    return checkpoint.fingerprint(MODEL_NAME, data.image_shape, data.classes, data.mean, data.std)


def fresh_state(
    parts: Trainable, generator: torch.Generator, data: ProcessedData, cfg: TrainConfig
) -> TrainingState:
    """Epoch 0: the initial weights, kept aside (copied) to be saved once the run exists."""
    return TrainingState.capture(
        parts,
        generator,
        epoch=0,
        global_step=0,
        history=[],
        fingerprint=model_fingerprint(data),
        config=loggable_params(cfg),
        keep=True,
    )


def restore(
    ckpt_dir: Path,
    fingerprint: str,
    cfg: TrainConfig,
    parts: Trainable,
    generator: torch.Generator,
    group: Group,
) -> TrainingState | None:
    """Load the newest valid checkpoint into the training objects (resume=true). Rank 0
    reads it and hands it to the other ranks, so all continue from the same file."""
    if group.main:
        checkpoint.remove_stale_temps(ckpt_dir)
    found = distributed.from_main(group, checkpoint.load_latest(ckpt_dir) if group.main else None)
    if found is None:
        log.warning("resume=true but no checkpoint in %s: starting fresh", ckpt_dir)
        return None
    state, path = found
    if state.fingerprint != fingerprint:
        raise PipelineError(
            f"{path}: checkpoint was trained for a different model or data "
            "(architecture, image shape, classes or normalisation); set resume=false to start fresh"
        )
    changed = [k for k in result_keys(TRAJECTORY) if state.config.get(k) != getattr(cfg, k)]
    if changed:
        log.warning(
            "resuming with %s changed since the checkpoint; optimizer and scheduler state "
            "continue from the checkpoint",
            ", ".join(f"{k}={getattr(cfg, k)} (was {state.config.get(k)})" for k in changed),
        )
    if state.world_size != group.world:
        log.warning(
            "resuming with %d processes, the checkpoint ran on %d: batches are shared out "
            "differently from here, so the trajectory changes (the model continues)",
            group.world,
            state.world_size,
        )
    state.restore(parts, generator, group.rank)
    log.info("resuming after epoch %d from %s (MLflow run %s)", state.epoch, path, state.run_id)
    state.config = loggable_params(cfg)
    if state.epoch < cfg.epochs:
        # Extended: test is measured again after the new last epoch. The history (and so
        # dvclive) keeps only that look, as a straight run has; MLflow keeps the earlier one.
        for entry in state.history:
            for name in TEST_METRIC_NAMES:
                entry["metrics"].pop(name, None)
    return state


def run_spec(
    cfg: TrainConfig,
    tracking_uri: str | None,
    device: torch.device,
    data: ProcessedData,
    resume_run_id: str | None,
    parent_run_id: str | None,
    tags: dict[str, str] | None,
) -> RunSpec | None:
    """The MLflow run this training writes to; None when MLflow is off."""
    if tracking_uri is None:
        return None
    return RunSpec(
        tracking_uri=tracking_uri,
        experiment_name=cfg.mlflow_exp_name,
        run_name=cfg.mlflow_run_name,
        tags=run_tags() | (tags or {}),
        parent_run_id=parent_run_id,
        resume_run_id=resume_run_id,
        metric_names=METRIC_NAMES + TEST_METRIC_NAMES,
        params=loggable_params(cfg) | {"device": str(device), "model": MODEL_NAME},
        dicts={"metadata.json": data.describe()},
        autolog=cfg.mlflow_autolog,
        system_metrics=cfg.mlflow_system_metrics,
        outage_wait_s=cfg.mlflow_outage_wait_s,
        checkpoint_dir=cfg.model_checkpoint_dir_path,
        registered_model_name=cfg.mlflow_registered_model_name,
    )


def check_finite(fit: EpochResult, epoch: int, lr: float, run_id: str | None) -> None:
    if not math.isfinite(fit.loss):
        raise TrainingDiverged(
            f"training diverged in epoch {epoch}: loss {fit.loss} (lr={lr}); "
            "lower lr or check the data",
            run_id,
        )


def epoch_metrics(fit: EpochResult, score: EpochResult) -> dict[str, float]:
    return {
        "train/loss": fit.loss,
        "train/accuracy": fit.accuracy,
        "val/loss": score.loss,
        "val/accuracy": score.accuracy,
    }


def final_metrics(score: EpochResult) -> dict[str, float]:
    return {"test/loss": score.loss, "test/accuracy": score.accuracy}


def on_first_epoch(
    tracker: Tracker,
    initial: TrainingState | None,
    ckpt_dir: Path,
    cfg: TrainConfig,
    first_epoch: int,
    resumed: bool,
    group: Group,
) -> None:
    """The MLflow run exists by now: save epoch 0 with its id, or tag the resumed run."""
    run_id = tracker.wait()
    if initial is not None:
        initial.run_id = run_id
        distributed.gather_rngs(initial, group)
        # A fresh run drops the old run's checkpoints only with its own first one.
        if group.main:
            initial.save(ckpt_dir, keep_previous=False)
    tracker.set_tags({"world_size": str(group.world)})
    if resumed:
        tracker.set_tags({"resumed_at_epoch": str(first_epoch), "epochs_total": str(cfg.epochs)})


def log_start(device: torch.device, data: ProcessedData, first_epoch: int, epochs: int) -> None:
    log.info(
        "training on %s: %d train / %d val / %d test images, %d classes, %dx%dx%d, epochs %d..%d",
        device,
        len(data.train.labels),
        len(data.val.labels),
        len(data.test.labels),
        len(data.classes),
        *data.image_shape,
        first_epoch,
        epochs,
    )


def log_epoch_line(epoch: int, epochs: int, metrics: dict[str, float], seconds: float) -> None:
    log.info(
        "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.2fs)",
        epoch,
        epochs,
        metrics["train/loss"],
        metrics["train/accuracy"],
        metrics["val/loss"],
        metrics["val/accuracy"],
        seconds,
    )


def save_state(
    parts: Trainable,
    generator: torch.Generator,
    state: TrainingState,
    epoch: int,
    train_count: int,
    cfg: TrainConfig,
    run_id: str | None,
    group: Group,
) -> None:
    """Checkpoint after ``epoch``: the state as it is now (every rank's RNG), filed under
    the run by rank 0."""
    steps_per_epoch = -(-train_count // cfg.train_bs)
    now = TrainingState.capture(
        parts,
        generator,
        epoch=epoch,
        global_step=state.global_step + (epoch - state.epoch) * steps_per_epoch,
        history=state.history,
        fingerprint=state.fingerprint,
        config=state.config,
    )
    now.run_id = run_id
    distributed.gather_rngs(now, group)
    if group.main:
        now.save(cfg.model_checkpoint_dir_path, keep_previous=True)


def publish_model(
    tracker: Tracker,
    model: torch.nn.Module,
    data: ProcessedData,
    test_split: TensorSplit,
    predicted: torch.Tensor,
    ckpt_dir: Path,
) -> None:
    """model.pt, the MLflow model (model.pt with its loader, logged on a thread of its own
    from here) and the confusion matrix (dvclive)."""
    model_file = checkpoint.save_model(
        ckpt_dir / checkpoint.MODEL_FILE,
        model,
        model_name=MODEL_NAME,
        classes=data.classes,
        image_shape=data.image_shape,
        mean=data.mean,
        std=data.std,
    )
    tracker.log_model(model_file)
    tracker.log_confusion_matrix(
        [data.classes[i] for i in test_split.labels.tolist()],
        [data.classes[i] for i in predicted.tolist()],
    )


def log_done(timings: Timings, metrics: dict[str, float]) -> None:
    log.info(
        "done in %.1fs (tracking: %.2fs on the training thread, %.2fs CPU in the background): "
        "val loss %.4f, accuracy %.4f; test (once) loss %.4f, accuracy %.4f",
        timings.total_s,
        timings.tracking_s,
        timings.tracking_background_cpu_s,
        metrics["val/loss"],
        metrics["val/accuracy"],
        metrics["test/loss"],
        metrics["test/accuracy"],
    )


def since_process_start() -> float:
    """Seconds since this process began (interpreter start-up and imports included)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except ImportError:  # psutil comes with mlflow; without it, report from import time
        return time.perf_counter()
