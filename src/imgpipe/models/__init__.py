"""Models: the one factory for every network the project builds or loads.

``model=convnet`` is the seed's CNN (the default, bit for bit as before); any other
``model`` is a timm architecture by name (``resnet18``, ``tf_efficientnet_lite0``,
``convnext_nano``, ...), randomly initialised or from a local weights file
(``model_weights``: a state dict as .pth or .safetensors; no network at run time).

    spec = describe("resnet18", classes=..., image_shape=(3, 224, 224), data_mean=...,
                    data_std=..., weights="resnet18.safetensors")
    model = build_model(spec)                 # any architecture, log-probabilities out
    load_pretrained(model, spec, "resnet18.safetensors")
    model, spec = load_model_file("models/model.pt")   # predict, serve, sync, registry

``ModelSpec`` records what a trained model needs to be rebuilt and fed an image
(architecture, classes, input size and mode, normalisation, resize rule, the weights
file's SHA-256); model.pt and the MLflow model carry it. Training, resume, sync, the
registry, the benchmark, predict and serve all build through ``build_model``.

Rooms: ``spec`` (the description), ``convnet`` (the seed CNN), ``factory`` (build and
load), ``weights`` (reading and fitting weights files), ``optim`` (optimizer and
schedule by name).
"""

from __future__ import annotations

import os

import torch

from imgpipe.models.convnet import CONVNET_ID, ConvNet
from imgpipe.models.factory import (
    TimmClassifier,
    build_model,
    check_architecture,
    describe,
    load_model_file,
    load_pretrained,
    model_file_content,
    pretrained_normalisation,
    spec_for,
)
from imgpipe.models.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    Trainable,
    make_optimizer,
    make_scheduler,
)
from imgpipe.models.spec import CONVNET, ModelSpec

__all__ = [
    "CONVNET",
    "CONVNET_ID",
    "OPTIMIZERS",
    "SCHEDULERS",
    "ConvNet",
    "ModelSpec",
    "TimmClassifier",
    "Trainable",
    "build_model",
    "build_trainable",
    "check_architecture",
    "describe",
    "load_model_file",
    "load_pretrained",
    "make_optimizer",
    "make_scheduler",
    "model_file_content",
    "pretrained_normalisation",
    "spec_for",
]


def build_trainable(
    spec: ModelSpec,
    *,
    device: torch.device,
    lr: float,
    gamma: float = 0.7,
    optimizer: str = "adadelta",
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    scheduler: str = "step",
    epochs: int = 1,
    warmup_epochs: int = 0,
    weights: str | os.PathLike[str] | None = None,
) -> Trainable:
    """The model of ``spec`` on ``device`` (from ``weights`` when given), its optimizer and
    schedule. The defaults are the seed's recipe: Adadelta, StepLR by ``gamma`` each epoch."""
    model = build_model(spec)
    if weights is not None:
        load_pretrained(model, spec, weights)
    model = model.to(device)
    opt = make_optimizer(
        optimizer,
        model.parameters(),
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
    )
    sched = make_scheduler(scheduler, opt, gamma=gamma, epochs=epochs, warmup_epochs=warmup_epochs)
    return Trainable(model, opt, sched)
