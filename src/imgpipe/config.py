"""Typed config at the edge: the stages' schemas, what each key changes, the value rules.

``conf/`` (Hydra) is the source of truth; these dataclasses say which keys a stage takes,
their types and defaults, and (``changes``) which of them change a result. A stage's
config is composed once, against these schemas, by ``imgpipe.compose`` (conf/ < params.yaml
under DVC < the command line); ``params.yaml`` is generated from ``conf/pipeline.yaml``
there too. Code below the entry points takes the dataclass, never a DictConfig.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imgpipe.errors import PipelineError


@dataclass
class ProcessDataConfig:
    raw_data_dir_path: str = "data/raw"
    processed_data_dir_path: str = "data/processed"
    log_dir: str = "./logs"
    num_workers: int = 0  # 0: every available core
    max_image_pixels: int = 89_478_485  # refuse larger image headers; 0: no limit
    val_fraction: float = 0.1  # of each class's train images, when the raw data has no val
    image_size: list[int] | None = None  # [height, width] every image is resized to; None: as is
    image_mode: str | None = None  # L or RGB, what every image is converted to; None: as is
    # A file of another format in a class folder (.gif, .heic): skip (one warning) or error.
    unsupported_files: str = "skip"

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        _check(self.max_image_pixels >= 0, "max_image_pixels", self.max_image_pixels, ">= 0")
        # Never 0: tuning needs a val split, and tuning on test is what val is there to stop.
        _check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "> 0 and < 1")
        size = self.image_size
        _check(
            size is None or (len(size) == 2 and all(side >= 1 for side in size)),
            "image_size",
            size,
            "null or [height, width], both >= 1",
        )
        _check(
            size is None or not self.max_image_pixels or size[0] * size[1] <= self.max_image_pixels,
            "image_size",
            size,
            f"at most max_image_pixels={self.max_image_pixels} pixels",
        )
        _check(
            self.image_mode in (None, "L", "RGB"), "image_mode", self.image_mode, "null, L or RGB"
        )
        _check(
            self.unsupported_files in ("skip", "error"),
            "unsupported_files",
            self.unsupported_files,
            "skip or error",
        )


DEVICES = ("auto", "cpu", "cuda", "mps")

# What a key changes, declared once beside the key; every other list of such keys (the
# resume warning, the sweep's study fingerprint, the DVC params of train and sweep) derives
# from it or is checked against it by a test. Keys without a role change where a run
# writes or how fast it goes (paths, tracking, devices), never its numbers.
TRAJECTORY = "trajectory"  # the path training takes: a resume with another value diverges
LENGTH = "length"  # how far training goes: a resume may extend it
EVALUATION = "evaluation"  # how the numbers are measured, not the weights
ROLES = (TRAJECTORY, LENGTH, EVALUATION)
# Which trials of a sweep train all their epochs: the sweep's result (its best trial, its
# Pareto front), never a training's. Not in ROLES: no training, resume or study fingerprint
# depends on it (a study may change it between runs); the sweep stage's DVC params do.
SWEEP = "sweep"


def _changes(role: str, default: Any) -> Any:
    return field(default=default, metadata={"changes": role})


@dataclass
class TrainConfig:
    lr: float = _changes(TRAJECTORY, 1.0)
    gamma: float = _changes(TRAJECTORY, 0.7)
    train_bs: int = _changes(TRAJECTORY, 64)
    test_bs: int = _changes(EVALUATION, 1000)
    epochs: int = _changes(LENGTH, 10)
    seed: int = _changes(TRAJECTORY, 1)
    # The model (imgpipe.models): `convnet` (the seed CNN) or a timm architecture by name,
    # from random weights or a local weights file; its normalisation follows the weights.
    model: str = _changes(TRAJECTORY, "convnet")
    model_weights: str | None = _changes(TRAJECTORY, None)
    # The optimizer and the schedule (imgpipe.models.optim), stepped once per epoch.
    optimizer: str = _changes(TRAJECTORY, "adadelta")
    weight_decay: float = _changes(TRAJECTORY, 0.0)
    momentum: float = _changes(TRAJECTORY, 0.9)  # sgd only
    nesterov: bool = _changes(TRAJECTORY, False)  # sgd only
    scheduler: str = _changes(TRAJECTORY, "step")
    warmup_epochs: int = _changes(TRAJECTORY, 0)  # cosine only
    # Augmentation of training batches (imgpipe.augment); null settings take the preset's.
    augment: str = _changes(TRAJECTORY, "none")
    augment_crop_scale: list[float] | None = _changes(TRAJECTORY, None)  # noqa: RUF009
    augment_flip: float | None = _changes(TRAJECTORY, None)
    augment_jitter: float | None = _changes(TRAJECTORY, None)
    augment_erase: float | None = _changes(TRAJECTORY, None)
    label_smoothing: float = _changes(TRAJECTORY, 0.0)
    log_interval: int = 10
    setup_mlflow: bool = True
    mlflow_autolog: bool = False
    mlflow_system_metrics: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_exp_name: str = "image-classification"
    mlflow_run_name: str = "train"
    mlflow_outage_wait_s: float = 120.0
    mlflow_registered_model_name: str | None = None
    # The seed's names, both kept: data_dir_path follows processed_data_dir_path (the
    # process_data stage's key) and model_checkpoint_dir_path follows artifact_dir_path,
    # through ${...} in conf/train_model.yaml, so one value sets both.
    processed_data_dir_path: str = "data/processed"  # process_data's: data_dir_path's default
    data_dir_path: str = "data/processed"
    model_checkpoint_interval: int = 1
    artifact_dir_path: str = "models"
    model_checkpoint_dir_path: str = "models"
    live_dir_path: str = "dvclive"
    live_images: bool = True  # PNGs of the plots at the end (imgpipe.plots): no result changes
    resume: bool = False
    log_dir: str = "./logs"
    no_cuda: bool | None = None  # deprecated (one release): mapped onto device
    no_mps: bool | None = None  # deprecated (one release): mapped onto device
    device: str = "auto"
    bf16: bool = _changes(TRAJECTORY, False)
    compile: bool = _changes(TRAJECTORY, False)
    # Processes per machine and machines (torchrun, `make train`): the world size splits
    # every batch over the processes, which changes the order of float sums.
    nproc_per_node: int = _changes(TRAJECTORY, 1)
    nnodes: int = _changes(TRAJECTORY, 1)
    # Splits bigger than this are streamed from their files (imgpipe.streaming): same
    # numbers either way, so no role. None: half of the memory available (cgroups count).
    memory_budget_mb: int | None = None
    # A sweep's pruning (imgpipe.sweep.pruning): which trials run all their epochs (SWEEP).
    sweep_pruner: str = _changes(SWEEP, "none")
    sweep_pruner_startup_trials: int = _changes(SWEEP, 3)
    sweep_pruner_warmup_epochs: int = _changes(SWEEP, 1)
    sweep_pruner_percentile: float = _changes(SWEEP, 50.0)
    sweep_pruner_objective: str | None = _changes(SWEEP, None)

    def __post_init__(self) -> None:
        _device_from_seed_keys(self)
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check_model_keys(self)
        _check(self.device in DEVICES, "device", self.device, "one of " + ", ".join(DEVICES))
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "in (0, 1]")
        _check(self.train_bs >= 1, "train_bs", self.train_bs, ">= 1")
        _check(self.test_bs >= 1, "test_bs", self.test_bs, ">= 1")
        _check(self.nproc_per_node >= 1, "nproc_per_node", self.nproc_per_node, ">= 1")
        _check(self.nnodes >= 1, "nnodes", self.nnodes, ">= 1")
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.log_interval >= 1, "log_interval", self.log_interval, ">= 1")
        _check(
            self.mlflow_outage_wait_s >= 0,
            "mlflow_outage_wait_s",
            self.mlflow_outage_wait_s,
            ">= 0",
        )
        _check(
            self.model_checkpoint_interval >= 1,
            "model_checkpoint_interval",
            self.model_checkpoint_interval,
            ">= 1",
        )
        _check(
            bool(self.mlflow_exp_name.strip()), "mlflow_exp_name", self.mlflow_exp_name, "non-empty"
        )
        _check(
            self.memory_budget_mb is None or self.memory_budget_mb >= 0,
            "memory_budget_mb",
            self.memory_budget_mb,
            ">= 0 or null",
        )
        _check(
            self.mlflow_registered_model_name is None
            or (
                bool(self.mlflow_registered_model_name.strip())
                and "'" not in self.mlflow_registered_model_name
            ),
            "mlflow_registered_model_name",
            self.mlflow_registered_model_name,
            "null or a non-empty name without quotes",
        )


OPTIMIZERS = ("adadelta", "sgd", "adamw")  # imgpipe.models.optim builds them
SCHEDULERS = ("step", "cosine", "none")
AUGMENTS = ("none", "basic", "strong")  # imgpipe.augment's presets


def _check_model_keys(cfg: TrainConfig) -> None:
    """The model, optimizer, schedule and augmentation keys (the architecture name and the
    weights file are checked by imgpipe.models before any work)."""
    _check(bool(cfg.model.strip()), "model", cfg.model, "convnet or a timm architecture name")
    for key, allowed in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS)):
        _check(getattr(cfg, key) in allowed, key, getattr(cfg, key), "one of " + ", ".join(allowed))
    _check(cfg.augment in AUGMENTS, "augment", cfg.augment, "one of " + ", ".join(AUGMENTS))
    _check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, ">= 0")
    _check(0 <= cfg.momentum < 1, "momentum", cfg.momentum, ">= 0 and < 1")
    _check(
        not cfg.nesterov or (cfg.optimizer == "sgd" and cfg.momentum > 0),
        "nesterov",
        cfg.nesterov,
        "false unless optimizer=sgd with momentum > 0",
    )
    _check(cfg.warmup_epochs >= 0, "warmup_epochs", cfg.warmup_epochs, ">= 0")
    _check(0 <= cfg.label_smoothing < 1, "label_smoothing", cfg.label_smoothing, ">= 0 and < 1")
    scale = cfg.augment_crop_scale
    _check(
        scale is None or (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1),
        "augment_crop_scale",
        scale,
        "null or [min, max] with 0 < min <= max <= 1",
    )
    for key in ("augment_flip", "augment_erase"):
        value = getattr(cfg, key)
        _check(value is None or 0 <= value <= 1, key, value, "null or a probability in [0, 1]")
    _check(
        cfg.augment_jitter is None or 0 <= cfg.augment_jitter < 1,
        "augment_jitter",
        cfg.augment_jitter,
        "null or a strength in [0, 1)",
    )


def _device_from_seed_keys(cfg: TrainConfig) -> None:
    """The seed's ``no_cuda``/``no_mps`` (deprecated) as the one ``device`` key: what
    ``auto`` would pick without them. Said once per process, in one line."""
    given = {k: v for k in ("no_cuda", "no_mps") if (v := getattr(cfg, k)) is not None}
    if not given:
        return
    cfg.no_cuda = cfg.no_mps = None
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"  # MPS is there
    before = cfg.device
    if before == "auto" and given.get("no_cuda") and (given.get("no_mps") or not apple):
        cfg.device = "cpu"
    elif before == "auto" and given.get("no_cuda"):
        cfg.device = "mps"
    elif before == "auto" and given.get("no_mps") and apple:
        cfg.device = "cpu"
    deprecated(
        ", ".join(f"{k}={str(v).lower()}" for k, v in given.items()),
        f"device={cfg.device}" + (" (unchanged)" if cfg.device == before else ""),
    )


_SAID: set[str] = set()


def deprecated(old: str, new: str) -> None:
    """One warning line per old spelling per process: it works this release, not the next."""
    if old not in _SAID:
        _SAID.add(old)
        logging.getLogger("imgpipe.config").warning(
            "config %s is deprecated and will stop working in the next release: "
            "taken as %s (set that instead)",
            old,
            new,
        )


def result_keys(*roles: str) -> tuple[str, ...]:
    """TrainConfig's keys that change a result, in declaration order; a training's roles
    (``ROLES``) by default, the sweep's (``SWEEP``) only when asked for."""
    wanted = roles or ROLES
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("changes") in wanted)


@dataclass
class PredictConfig:
    """The predict stage and ``make serve`` (conf/predict.yaml; imgpipe.predict, imgpipe.serve)."""

    predict_input: str = "data/raw/test"  # a folder in either raw layout, labels optional
    # models/model.pt, models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model
    predict_model: str = "models/model.pt"
    predict_output_dir: str = "predictions"
    predict_top_k: int = 3
    predict_batch_size: int = 256
    predict_num_workers: int = 0  # decoding processes; 0: every available core
    predict_max_image_pixels: int = 89_478_485  # as process_data's max_image_pixels
    serve_model: str | None = None  # None: the champion of the registered name, else model.pt
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_max_bytes: int = 10 << 20  # larger uploads are refused (413) before they are read
    log_dir: str = "./logs"

    def __post_init__(self) -> None:
        _check(self.predict_top_k >= 1, "predict_top_k", self.predict_top_k, ">= 1")
        _check(self.predict_batch_size >= 1, "predict_batch_size", self.predict_batch_size, ">= 1")
        _check(
            self.predict_num_workers >= 0, "predict_num_workers", self.predict_num_workers, ">= 0"
        )
        _check(
            self.predict_max_image_pixels >= 0,
            "predict_max_image_pixels",
            self.predict_max_image_pixels,
            ">= 0",
        )
        _check(0 < self.serve_port < 65536, "serve_port", self.serve_port, "a TCP port")
        _check(self.serve_max_bytes >= 1, "serve_max_bytes", self.serve_max_bytes, ">= 1")


SCHEMAS: dict[str, type] = {
    "process_data": ProcessDataConfig,
    "train_model": TrainConfig,
    "predict": PredictConfig,
}


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise PipelineError(f"config key '{key}': {value!r} is invalid, must be {rule}")


def conf_dir() -> Path:
    """The project's conf/ (next to src/), whatever the current directory is."""
    return Path(__file__).resolve().parents[2] / "conf"


def to_schema(schema: type, cfg: Any, source: str = "config") -> Any:
    """Check a composed config against ``schema``: unknown keys, types, value rules.

    ``cfg`` is a DictConfig or mapping without the ``hydra`` node. Every problem
    becomes one ``PipelineError`` line naming the key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    data.pop("hydra", None)
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PipelineError(
            f"{source}: unknown config key '{unknown[0]}' (known: {', '.join(sorted(known))})"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise PipelineError(f"{source}: config key '{key}': {msg}") from exc


def to_plain(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
