"""The training job as one story: config -> data -> model -> for each epoch: fit,
evaluate, track, checkpoint -> result.

Where to change what: the model, optimizer and schedule in ``models`` (the one factory);
augmentation in ``augment``; one epoch's arithmetic in ``engine``; metric names in
``metrics``; what a checkpoint holds in ``checkpoint`` and what resume accepts in
``resume``; what is tracked where in ``tracking``; which keys change a result in ``config``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from imgpipe import checkpoint, distributed, progress, resume, runlock, stop
from imgpipe.checkpoint import TrainingState
from imgpipe.config import TrainConfig
from imgpipe.data.processed import ProcessedData, load_processed
from imgpipe.distributed import Group
from imgpipe.engine import (
    TensorSplit,
    evaluate,
    pick_device,
    train_one_epoch,
)
from imgpipe.metrics import (
    METRIC_NAMES,
    TEST_METRIC_NAMES,
    TrainingDiverged,
    check_finite,
    epoch_metrics,
    final_metrics,
)
from imgpipe.models import ModelSpec
from imgpipe.parts import build_parts, describe_model, loggable_params, make_augmenter
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

# The names every tracker and test uses, re-exported beside the story that logs them.
__all__ = ["METRIC_NAMES", "TEST_METRIC_NAMES", "TrainResult", "TrainingDiverged", "train"]


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


# Called by rank 0 after each epoch is logged and checkpointed, with the epoch, its metrics
# and the MLflow run id; it may raise to end training there (a sweep prunes a trial so).
EpochHook = Callable[[int, dict[str, float], str | None], None]


def train(
    cfg: TrainConfig,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train the CNN described by ``cfg``. ``parent_run_id`` nests the MLflow run under a
    sweep's parent run; ``tags`` are added to the run's own; ``on_epoch`` sees every epoch
    (``EpochHook``). Started by torchrun, this process is one rank of a group
    (``imgpipe.distributed``)."""
    group = distributed.Group.from_env()
    distributed.quiet_other_ranks(group)
    distributed.check_world(cfg.nproc_per_node * cfg.nnodes, group)
    # One live training per checkpoint folder: a second one stops here, naming the holder
    # (rank 0 holds it for its group).
    ckpt = cfg.model_checkpoint_dir_path
    held = runlock.lock(ckpt) if group.main else contextlib.nullcontext()
    with distributed.session(group), held:
        return _train(cfg, parent_run_id, tags, group, on_epoch)


def _train(
    cfg: TrainConfig,
    parent_run_id: str | None,
    tags: dict[str, str] | None,
    group: Group,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    started = time.perf_counter()
    tracking_uri = resolve_tracking_uri(cfg.mlflow_tracking_uri) if cfg.setup_mlflow else None
    if tracking_uri:
        check_tracking_uri(tracking_uri)  # before any data is read: fail in seconds, not minutes

    # data
    device = distributed.start(group, pick_device(cfg.device, cfg.no_cuda, cfg.no_mps))
    data = load_processed(cfg.data_dir_path)
    # What the model is: the architecture, its weights file and the normalisation they
    # were trained with (the data's own statistics without a file); checked before any work.
    model_spec = describe_model(cfg, data)
    # In memory while the budget lasts, else streamed from the files: the same numbers.
    normalised_as = replace(data, mean=model_spec.mean, std=model_spec.std)
    splits = open_splits(normalised_as, ("train", "val", "test"), device, cfg.memory_budget_mb)
    train_split, val_split, test_split = splits["train"], splits["val"], splits["test"]

    # model, optimizer, schedule, augmentation; continued from the checkpoint on resume
    generator = seed_everything(cfg.seed)
    parts = build_parts(cfg, model_spec, device)
    distributed.seed_rank(cfg.seed, group)  # dropout: each rank its own masks
    augmenter = make_augmenter(cfg, model_spec, device, group.rank)  # None: augment=none
    ckpt_dir = Path(cfg.model_checkpoint_dir_path)
    state = resume.fresh_state(parts, generator, model_spec, cfg, augmenter)
    resumed = False
    # A group that torchrun restarted (--max-restarts) continues its checkpoint.
    if cfg.resume or distributed.restarted():
        found = resume.restore(
            ckpt_dir, state.fingerprint, cfg, loggable_params(cfg, model_spec), parts,
            generator, group, augmenter,
        )  # fmt: skip
        if found:
            state, resumed = found, True
    # The compiled module shares the model's parameters: training goes through it, while
    # checkpoints and the exported model use the plain module (no "_orig_mod." keys).
    net = torch.compile(parts.model) if cfg.compile else parts.model
    # Several processes: DDP averages the gradients; each takes its share of every batch.
    trained = distributed.wrap(net, group, device)
    share = {"rank": group.rank, "world": group.world}
    first_epoch = state.epoch + 1
    log_start(device, data, first_epoch, cfg.epochs)

    spec = run_spec(cfg, tracking_uri, device, data, model_spec, state, parent_run_id, tags)
    # Rank 0 alone talks to the world: MLflow, dvclive, checkpoints, the model.
    tracker = (
        Tracker(cfg.live_dir_path, spec, images=cfg.live_images) if group.main else SilentTracker()
    )
    # Epoch 0 (the initial state) is checkpointed after the first epoch, without waiting for
    # the MLflow run (made meanwhile): a run refused later (HTTP 403, an unusable experiment)
    # puts the older checkpoints back (resume.Checkpoints). Checkpoints carry the run's key
    # too: `imgpipe sync` and a resume find the run by it when a checkpoint lacks the id.
    saved = resume.Checkpoints(tracker, ckpt_dir, group.main)
    with run_named(tracker), saved.filed(), tracker:
        if resumed:
            tracker.replay(state.history)
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
                    augment=augmenter,
                    label_smoothing=cfg.label_smoothing,
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
                on_first_epoch(tracker, initial, saved, cfg, first_epoch, resumed, group)
            tracker.log_epoch(epoch, metrics)
            state.history.append({"epoch": epoch, "metrics": metrics})
            log_epoch_line(epoch, cfg.epochs, metrics, time.perf_counter() - t0)
            if epoch % cfg.model_checkpoint_interval == 0 or epoch == cfg.epochs:
                saved.add(
                    resume.capture_state(
                        parts, generator, augmenter, state, epoch, len(train_split), cfg, group
                    )
                )
            epochs_s += time.perf_counter() - t0
            if on_epoch is not None and group.main:
                on_epoch(epoch, metrics, tracker.run_id)

        # the trained model
        if predicted is None:  # resumed a run that had already reached `epochs`
            tested, predicted = evaluate(net, test_split, cfg.test_bs, cfg.bf16, **share)
            metrics |= final_metrics(tested)  # as logged then: the same weights
        if group.main:
            publish_model(tracker, parts.model, model_spec, test_split, predicted, ckpt_dir)

    timings = Timings(
        fit_s, epochs_s, time.perf_counter() - started, tracker.blocking_s,
        tracker.background_cpu_s, first_step_s,
    )  # fmt: skip
    log_done(timings, metrics)
    return TrainResult.of(metrics, tracker.run_id, timings)


# --------------------------------------------------------------------------- the story's steps


def run_spec(
    cfg: TrainConfig,
    tracking_uri: str | None,
    device: torch.device,
    data: ProcessedData,
    model: ModelSpec,
    state: TrainingState,
    parent_run_id: str | None,
    tags: dict[str, str] | None,
) -> RunSpec | None:
    """The MLflow run this training writes to (``state``'s run, or a new one with its
    key); None when MLflow is off."""
    if tracking_uri is None:
        return None
    return RunSpec(
        tracking_uri=tracking_uri,
        experiment_name=cfg.mlflow_exp_name,
        run_name=cfg.mlflow_run_name,
        tags=run_tags() | (tags or {}),
        parent_run_id=parent_run_id,
        resume_run_id=state.run_id,
        run_key=state.run_key,
        metric_names=METRIC_NAMES + TEST_METRIC_NAMES,
        params=loggable_params(cfg, model) | {"device": str(device)},
        dicts={"metadata.json": data.describe()},
        autolog=cfg.mlflow_autolog,
        system_metrics=cfg.mlflow_system_metrics,
        outage_wait_s=cfg.mlflow_outage_wait_s,
        checkpoint_dir=cfg.model_checkpoint_dir_path,
        registered_model_name=cfg.mlflow_registered_model_name,
    )


def on_first_epoch(
    tracker: Tracker | SilentTracker,
    initial: TrainingState | None,
    saved: resume.Checkpoints,
    cfg: TrainConfig,
    first_epoch: int,
    resumed: bool,
    group: Group,
) -> None:
    """Epoch 0 of a fresh training to its checkpoints (``resume.Checkpoints``), tag the
    run."""
    if initial is not None:
        distributed.gather_rngs(initial, group)
        saved.begin(initial)
    tracker.set_tags({"world_size": str(group.world)})
    if resumed:
        tracker.set_tags({"resumed_at_epoch": str(first_epoch), "epochs_total": str(cfg.epochs)})


@contextlib.contextmanager
def run_named(tracker: Tracker | SilentTracker) -> Iterator[None]:
    """An error that names the MLflow run (a divergence, a pruned trial) but was raised
    before the run's id was known names it once the run has ended."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "run_id", "") is None:
            exc.run_id = tracker.run_id
        raise


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


def publish_model(
    tracker: Tracker,
    model: torch.nn.Module,
    spec: ModelSpec,
    test_split: TensorSplit,
    predicted: torch.Tensor,
    ckpt_dir: Path,
) -> None:
    """model.pt (the weights and the spec that rebuilds them), the MLflow model (model.pt
    with its loader, logged on a thread of its own from here) and the confusion matrix."""
    model_file = checkpoint.save_model(ckpt_dir / checkpoint.MODEL_FILE, model, spec)
    tracker.log_model(model_file)
    tracker.log_confusion_matrix(
        [spec.classes[i] for i in test_split.labels.tolist()],
        [spec.classes[i] for i in predicted.tolist()],
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
