"""The training's parts, made from its config: the model's spec (architecture, weights
file, normalisation), the model with its optimizer and schedule, the augmenter, and the
params a run records. The one place where config keys turn into the factory's arguments
(``imgpipe.models``, ``imgpipe.augment`` take plain values, never a config)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from imgpipe import augment
from imgpipe.config import TrainConfig
from imgpipe.data.processed import ProcessedData
from imgpipe.models import ModelSpec, Trainable, build_trainable, describe
from imgpipe.redact import redact_url


def loggable_params(cfg: TrainConfig, model: ModelSpec) -> dict[str, Any]:
    """The config as MLflow params, with any URL password redacted, and the SHA-256 of the
    weights file the model started from (null: random weights)."""
    params = asdict(cfg)
    if params.get("mlflow_tracking_uri"):
        params["mlflow_tracking_uri"] = redact_url(params["mlflow_tracking_uri"])
    return params | {"model_weights_sha256": model.weights_sha256}


def describe_model(cfg: TrainConfig, data: ProcessedData) -> ModelSpec:
    """The model to train on ``data``: ``cfg.model`` from ``cfg.model_weights``."""
    return describe(
        cfg.model,
        classes=data.classes,
        image_shape=data.image_shape,
        data_mean=data.mean,
        data_std=data.std,
        weights=cfg.model_weights,
        image_mode=data.mode or None,
        resize=data.preprocessing,
    )


def build_parts(cfg: TrainConfig, spec: ModelSpec, device: torch.device) -> Trainable:
    """The model (from the weights file, if any), its optimizer and schedule."""
    return build_trainable(
        spec,
        device=device,
        lr=cfg.lr,
        gamma=cfg.gamma,
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        scheduler=cfg.scheduler,
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        weights=cfg.model_weights,
    )


def make_augmenter(
    cfg: TrainConfig, spec: ModelSpec, device: torch.device, rank: int
) -> augment.Augmenter | None:
    """The training batches' augmenter (its own generator, per rank); None when off."""
    chosen = augment.settings(
        cfg.augment,
        crop_scale=cfg.augment_crop_scale,
        flip=cfg.augment_flip,
        jitter=cfg.augment_jitter,
        erase=cfg.augment_erase,
    )
    if not chosen.active:
        return None
    return augment.Augmenter(chosen, spec.mean, spec.std, device, cfg.seed, rank)
