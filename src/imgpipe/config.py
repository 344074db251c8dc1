"""Typed config at the edge: schemas, the one load per stage, and conf/ -> params.yaml.

``conf/`` (Hydra) is the source of truth. ``params.yaml`` is generated from
``conf/pipeline.yaml`` (which composes the per-stage files) in exactly the
format DVC writes on ``dvc exp run`` with ``hydra.enabled``, so both agree.

A stage's config is composed ONCE, by ``compose_stage``/``load_stage_config``, through
Hydra's compose API with the stage's dataclass schema registered in Hydra's ConfigStore,
so Hydra itself refuses an unknown key or a wrong type (one ``error:`` line). Layers, last
wins: conf/<stage>.yaml < the params file < the command line. Under DVC the Make stage
targets set ``IMGPIPE_PARAMS_FILE=params.yaml`` (that is where ``dvc exp run -S lr=1.4``
lands); the params file is a config node of its own in the composition, not override
strings. The entry points, ``imgpipe`` subcommands and the sweep all take this object.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imgpipe.errors import PipelineError

PARAMS_FILE_ENV = "IMGPIPE_PARAMS_FILE"
PIPELINE_CONFIG = "pipeline"


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


def result_keys(*roles: str) -> tuple[str, ...]:
    """TrainConfig's keys that change a result, in declaration order; all roles by default."""
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
        _check(
            self.predict_batch_size >= 1, "predict_batch_size", self.predict_batch_size, ">= 1"
        )
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


# --------------------------------------------------------------------------- loading


SCHEMA_GROUP = "imgpipe_schema"
PARAMS_GROUP = "imgpipe_params"


def register_schemas() -> None:
    """Put each stage's schema into Hydra's ConfigStore under a primary config of its own,
    ``imgpipe_<stage>``: the schema first, then conf/<stage>.yaml over it (so Hydra checks
    every key and type of the file and the overrides). conf/ itself names no schema: DVC
    composes it as plain values."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for stage, schema in SCHEMAS.items():
        group = f"{SCHEMA_GROUP}/{stage}"
        store.store(group=group, name="schema", node=schema, package="_global_", replace=True)
        store.store(
            name=f"imgpipe_{stage}",
            node={"defaults": [{f"{group}@_global_": "schema"}, stage, "_self_"]},
            replace=True,
        )


def compose_stage(
    stage: str,
    overrides: Sequence[str] = (),
    *,
    params_file: str | os.PathLike[str] | None = None,
    return_hydra_config: bool = False,
) -> Any:
    """Compose one stage's config, checked by Hydra against its schema: the DictConfig.

    Layers, last wins: ``conf/<stage>.yaml`` < the params file < ``overrides`` (Hydra
    override strings: ``lr=1.4``; sweeps such as ``lr=choice(1,2)`` are refused: the sweep
    takes them out first). ``params_file``: that file; None: the one IMGPIPE_PARAMS_FILE
    names (set by the Make stage targets under DVC), if any; ``""``: none. Only the stage's
    own keys are read from it (params.yaml holds every stage's). ``return_hydra_config``:
    keep the ``hydra`` node (the sweeper block), as the sweep needs.

    An unknown key, a wrong type, a bad override or an unreadable params file raises
    ``PipelineError`` with one line naming the key and the file.
    """
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    schema = SCHEMAS[stage]
    source = f"conf/{stage}.yaml"
    register_schemas()
    layers = list(overrides)
    path = os.environ.get(PARAMS_FILE_ENV) if params_file is None else os.fspath(params_file)
    if path:
        values = _params_file_values(path, schema)
        ConfigStore.instance().store(
            group=f"{PARAMS_GROUP}/{stage}",
            name="file",
            node=values,
            package="_global_",
            replace=True,
        )
        # Appended defaults merge after the stage file's own values, before the overrides.
        layers.insert(0, f"+{PARAMS_GROUP}/{stage}@_global_=file")
        source = f"{source} < {path}"
    try:
        with initialize_config_dir(str(conf_dir())):
            return compose(
                f"imgpipe_{stage}", overrides=layers, return_hydra_config=return_hydra_config
            )
    except (HydraException, OmegaConfBaseException) as exc:
        raise PipelineError(_one_line(exc, source, schema)) from None
    except yaml.YAMLError as exc:  # a conf/ file that is not YAML (a duplicate key, say)
        mark = getattr(exc, "problem_mark", None)
        where = f"conf/{Path(mark.name).name} line {mark.line + 1}" if mark else f"conf/{stage}"
        raise PipelineError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None



def load_stage_config(
    stage: str,
    overrides: Sequence[str] = (),
    *,
    params_file: str | os.PathLike[str] | None = None,
) -> Any:
    """The typed config a stage runs with (``ProcessDataConfig``, ``TrainConfig``):
    ``compose_stage`` (conf/ < params file < overrides, same arguments), then the value
    rules of the schema's ``__post_init__``. The one door for entry points, commands that
    read the project's settings, and the sweep's base values."""
    cfg = compose_stage(stage, overrides, params_file=params_file)
    return to_schema(SCHEMAS[stage], cfg, f"conf/{stage}.yaml")


def _params_file_values(path: str, schema: type) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            params = yaml.safe_load(fh) or {}
    except FileNotFoundError as exc:
        raise PipelineError(f"{path}: params file not found (run `make params`)") from exc
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(params, dict):
        raise PipelineError(f"{path}: expected a mapping of config keys")
    known = {f.name for f in fields(schema)}
    return {k: v for k, v in params.items() if k in known}


def _one_line(exc: BaseException, source: str, schema: type) -> str:
    """Hydra's and OmegaConf's messages span several lines: one, naming the key."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    known = ", ".join(sorted(f.name for f in fields(schema)))
    text = str(exc)
    if isinstance(exc, OverrideParseException):
        return f"bad override: {text.splitlines()[0]}"
    if m := re.match(r"Could not override '([^']+)'", text):
        return f"{source}: unknown config key '{m.group(1)}' (known: {known})"
    if m := re.search(r"Ambiguous value for argument '([^']+)'", text):
        return f"override '{m.group(1)}=...' is a sweep: add --multirun"
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    key = getattr(cause, "full_key", None) or ""
    if isinstance(cause, ConfigKeyError) and key:
        return f"{source}: unknown config key '{key}' (known: {known})"
    lines = [line for line in text.splitlines() if line.strip()]
    detail = lines[-1] if len(lines) > 1 and "Error merging" in lines[0] else lines[0]
    if key:
        detail = str(cause).splitlines()[0] if cause is not None else detail
        return f"{source}: config key '{key}': {detail}"
    return f"{source}: {detail}"


def stage_config_yaml(config: Any) -> str:
    """A typed config as YAML (``--cfg job``, ``imgpipe config show``)."""
    import yaml

    return yaml.safe_dump(to_plain(config), sort_keys=False)


# --------------------------------------------------------------------------- params.yaml


def compose_params(overrides: list[str] | None = None) -> str:
    """Compose conf/pipeline.yaml the way ``dvc exp run`` does and return the YAML text."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(conf_dir())):
        cfg = compose(config_name=PIPELINE_CONFIG, overrides=overrides or [])
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)
