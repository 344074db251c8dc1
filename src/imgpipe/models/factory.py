"""The one door to a network: ``build_model(spec)`` for the seed's CNN or any timm
architecture, ``describe`` for the spec of a new training, ``load_model_file`` for a
trained model.pt. Nothing else in the project constructs a model.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imgpipe.errors import PipelineError
from imgpipe.models import weights as weights_io
from imgpipe.models.convnet import CONVNET_ID, ConvNet
from imgpipe.models.spec import CONVNET, ModelSpec, image_mode_for

log = logging.getLogger(__name__)


class TimmClassifier(nn.Module):
    """A timm network whose logits become log-probabilities, as the seed's CNN returns:
    one output contract (and one loss, ``nll_loss``) for every architecture."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.net(x), dim=1)


def check_architecture(architecture: str) -> None:
    """``convnet`` or a name timm knows; else one line with the closest names it knows."""
    if architecture == CONVNET:
        return
    import timm

    if timm.is_model(architecture.split(".")[0]):
        return
    known = [CONVNET, *timm.list_models()]
    close = difflib.get_close_matches(architecture, known, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else "see timm.list_models()"
    raise PipelineError(f"config key 'model': unknown architecture {architecture!r} ({hint})")


def _timm_net(spec: ModelSpec) -> nn.Module:
    import timm

    return timm.create_model(
        spec.architecture,
        pretrained=False,
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
    )


def build_model(spec: ModelSpec) -> nn.Module:
    """The network ``spec`` describes, freshly initialised from torch's RNG (load weights
    into it afterwards: ``load_pretrained`` or a model.pt's ``state_dict``). Its output is
    log-probabilities, shape (N, ``spec.num_classes``)."""
    check_architecture(spec.architecture)
    if spec.architecture == CONVNET:
        return ConvNet(spec.in_chans, *spec.input_size, spec.num_classes)
    return TimmClassifier(_timm_net(spec))


def pretrained_normalisation(architecture: str, in_chans: int) -> tuple[tuple, tuple] | None:
    """(mean, std) the architecture's published weights were trained with (timm's
    pretrained config), averaged over RGB for 1-channel data (timm sums the first layer's
    RGB weights for it); None when timm records none."""
    if architecture == CONVNET:
        return None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(architecture)
    mean, std = (cfg.mean, cfg.std) if cfg is not None else (None, None)
    if not mean or not std:
        return None
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if in_chans == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if len(mean) != in_chans:
        return None
    return mean, std


def describe(
    architecture: str,
    *,
    classes: list[str] | tuple[str, ...],
    image_shape: tuple[int, int, int],
    data_mean: tuple[float, ...],
    data_std: tuple[float, ...],
    weights: str | os.PathLike[str] | None = None,
    image_mode: str | None = None,
    resize: dict[str, Any] | None = None,
) -> ModelSpec:
    """The spec of a model about to be trained on data of ``image_shape`` (C, H, W) with
    ``classes``. Normalisation: with ``weights``, the one those weights were trained with
    (timm's pretrained config); without (or for the seed CNN), the data's statistics.
    Checks the architecture and the weights file (exists, readable) before any work."""
    check_architecture(architecture)
    channels, height, width = image_shape
    mean, std = tuple(data_mean), tuple(data_std)
    sha = name = None
    if weights is not None:
        file = weights_io.check_file(weights)
        sha, name = weights_io.file_sha256(file), file.name
        pretrained = pretrained_normalisation(architecture, channels)
        if pretrained is not None:
            mean, std = pretrained
        else:
            log.info("%s: no published normalisation; using the data's", architecture)
    return ModelSpec(
        architecture=architecture,
        classes=tuple(classes),
        in_chans=channels,
        input_size=(height, width),
        image_mode=image_mode or image_mode_for(channels),
        mean=mean,
        std=std,
        resize=dict(resize or {}),
        weights_sha256=sha,
        weights_file=name,
    )


def spec_for(
    data: Any, architecture: str = CONVNET, weights: str | os.PathLike[str] | None = None
) -> ModelSpec:
    """``describe`` for processed data (anything with ``classes``, ``image_shape``,
    ``mean``, ``std`` and, optionally, ``mode`` and ``preprocessing``: a ProcessedData)."""
    return describe(
        architecture,
        classes=data.classes,
        image_shape=data.image_shape,
        data_mean=data.mean,
        data_std=data.std,
        weights=weights,
        image_mode=getattr(data, "mode", None) or None,
        resize=getattr(data, "preprocessing", None),
    )


def load_pretrained(model: nn.Module, spec: ModelSpec, path: str | os.PathLike[str]) -> None:
    """Load the weights file ``path`` into ``model`` (built by ``build_model(spec)``): the
    head stays new when the classes differ, the first layer is adapted to ``in_chans``.
    One line naming the file when it is missing, not a state dict, holds code, or belongs
    to another architecture (the first tensor whose shape differs)."""
    if weights_io.file_sha256(path) != spec.weights_sha256:
        raise PipelineError(f"model_weights: {path} changed since the run started")
    if isinstance(model, TimmClassifier):
        cfg = model.net.pretrained_cfg
        weights_io.load_weights(
            model.net,
            path,
            architecture=spec.architecture,
            first_conv=cfg.get("first_conv"),
            classifier=cfg.get("classifier"),
        )
    else:
        weights_io.load_weights(model, path, architecture=spec.architecture)


def spec_of_model_file(saved: dict[str, Any], source: str) -> ModelSpec:
    """The spec a model.pt carries; files from before specs (the seed CNN) describe it
    through their own keys."""
    if "spec" in saved:
        return ModelSpec.from_dict(saved["spec"], source)
    if saved.get("model_name") != CONVNET_ID:
        raise PipelineError(f"{source}: model {saved.get('model_name')!r} is not described")
    channels, height, width = saved["image_shape"]
    return ModelSpec(
        architecture=CONVNET,
        classes=tuple(saved["classes"]),
        in_chans=channels,
        input_size=(height, width),
        image_mode=image_mode_for(channels),
        mean=tuple(saved["mean"]),
        std=tuple(saved["std"]),
    )


def load_model_file(path: str | os.PathLike[str]) -> tuple[nn.Module, ModelSpec]:
    """A trained model.pt as (model in eval mode on the CPU, its spec). The file is read
    with ``weights_only`` and its digest checked (``imgpipe.torchfile.load_model_file``); a
    file that is missing, damaged, does not describe a model, or whose weights do not fit
    what it describes, is one line naming it."""
    from imgpipe import torchfile

    source = str(Path(path))
    saved = torchfile.load_model_file(path)
    spec = spec_of_model_file(saved, source)
    model = build_model(spec)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise PipelineError(f"{source}: weights do not fit {spec.architecture}: {first}") from exc
    return model.eval(), spec


def model_file_content(model: nn.Module, spec: ModelSpec) -> dict[str, Any]:
    """What model.pt holds: the spec, the weights, and the seed's keys (``model_name``,
    ``classes``, ``image_shape``, ``mean``, ``std``) that older readers use."""
    return {
        "spec": spec.to_dict(),
        "model_name": spec.identity,
        "state_dict": model.state_dict(),
        "classes": list(spec.classes),
        "image_shape": list(spec.image_shape),
        "mean": list(spec.mean),
        "std": list(spec.std),
    }
