"""Moved to ``imgpipe.models`` (the one model factory); this module keeps the old names
until every importer has moved, then goes."""

from __future__ import annotations

import torch

from imgpipe.models import ConvNet, ModelSpec, Trainable
from imgpipe.models import build_trainable as _build
from imgpipe.models.convnet import CONVNET_ID as MODEL_NAME

__all__ = ["MODEL_NAME", "ConvNet", "Trainable", "build_trainable"]


def build_trainable(
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    lr: float,
    gamma: float,
    device: torch.device,
) -> Trainable:
    """The seed's recipe for data of ``image_shape``: see ``imgpipe.models.build_trainable``."""
    channels, height, width = image_shape
    spec = ModelSpec(
        architecture="convnet",
        classes=tuple(str(i) for i in range(num_classes)),
        in_chans=channels,
        input_size=(height, width),
        image_mode="L" if channels == 1 else "RGB",
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
    )
    return _build(spec, device=device, lr=lr, gamma=gamma)
