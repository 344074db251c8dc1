"""A trained model ready to classify images: the preprocessing it was trained with and the
forward pass, shared by ``predict`` (a folder), ``serve`` (uploads) and the MLflow model
(``tracking.pyfunc``).

    classifier = Classifier.load("models/model.pt")       # weights_only, digest checked
    row = classifier.prepare_file("new/cat.png")           # (H, W, C) uint8, as process_data
    probs = classifier.probabilities(np.stack([row]))      # (N, classes) float32

An image goes from bytes to the model's input exactly as ``process_data`` took the training
images there: the decoder its extension (or an upload's declared type) names, content
checked against it, the header's size against the pixel budget before any pixel is
decoded, then converted and resized by the model's rule (``data.process.Target``: the
same code, so the same pixels). Normalisation is ``engine.normalisation``, the arithmetic
training used, so a batch of the test split scores bit for bit as training scored it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgpipe.data.files import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_FORMATS, content_format
from imgpipe.data.process import Target, _decode_pixels, decode_image_data
from imgpipe.engine import normalisation
from imgpipe.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """What an image must become before the model sees it, as the model file records it."""

    height: int
    width: int
    mode: str  # L or RGB
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: bool = False  # another size is resized (process_data's filter); False: refused
    convert: bool = False  # another mode is converted; False: refused (palette and 1-bit aside)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def target(self, max_pixels: int) -> Target:
        return Target(
            size=(self.width, self.height),
            mode=self.mode,
            max_pixels=max_pixels,
            resize=self.resize,
            convert=self.convert,
        )

    def describe(self) -> dict[str, Any]:
        return asdict(self) | {"mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the class, its probability, and the ``k`` most likely classes."""

    prediction: str
    probability: float
    top_k: list[tuple[str, float]]

    def as_json(self) -> dict[str, Any]:
        return {
            "prediction": self.prediction,
            "probability": self.probability,
            "top_k": [{"class": c, "probability": p} for c, p in self.top_k],
        }


class Classifier:
    """A network in eval mode with its classes and preprocessing; thread-safe for
    ``probabilities`` (no state changes after loading)."""

    def __init__(
        self,
        network: torch.nn.Module,
        classes: Sequence[str],
        preprocessing: Preprocessing,
        *,
        architecture: str,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.network = network.cpu().eval()
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.architecture = architecture
        self.target = preprocessing.target(max_image_pixels)
        self._scale, self._shift = normalisation(preprocessing.mean, preprocessing.std)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> Classifier:
        """A model.pt (``weights_only``, checked against its content digest)."""
        network, classes, prep, architecture = _read_model_file(Path(path))
        return cls(
            network, classes, prep, architecture=architecture, max_image_pixels=max_image_pixels
        )

    # ------------------------------------------------------------------ images -> rows

    @property
    def row_shape(self) -> tuple[int, int, int]:
        p = self.preprocessing
        return (p.height, p.width, p.channels)

    def prepare_file(self, path: str, out: np.ndarray | None = None) -> np.ndarray:
        """One image file as a (H, W, C) uint8 row, written into ``out`` when given;
        PipelineError naming the file when it cannot be (format, size, mode, damage)."""
        row = np.empty(self.row_shape, np.uint8) if out is None else out
        pixels = _decode_pixels(path, self.target, row)
        if pixels is not None:
            row.reshape(-1)[:] = np.frombuffer(pixels, np.uint8)
        return row

    def prepare_upload(self, data: bytes, fmt: str | None, name: str) -> np.ndarray:
        """An image held in memory (an upload) as a (H, W, C) uint8 row. ``fmt`` is the
        Pillow format the sender declared (``data.files.IMAGE_FORMATS``), and the content
        must be of it; None: the content's signature picks among the supported formats
        only (never Pillow's open-ended detection)."""
        if not data:
            raise PipelineError(f"{name}: empty (no image bytes)")
        if fmt is None:
            fmt = content_format(data[:16])
            if fmt is None:
                raise PipelineError(
                    f"{name}: not an image of a supported format "
                    f"({', '.join(dict.fromkeys(IMAGE_FORMATS.values()))})"
                )
        pixels = decode_image_data(data, fmt, name, self.target)
        # A writable copy: torch.from_numpy warns about read-only arrays (bytes' buffer).
        return np.frombuffer(bytearray(pixels), np.uint8).reshape(self.row_shape)

    # ------------------------------------------------------------------ rows -> classes

    def log_probabilities(self, rows: np.ndarray) -> torch.Tensor:
        """(N, classes) log-probabilities of a (N, H, W, C) uint8 batch, normalised with
        training's arithmetic (``engine.TensorSplit``)."""
        pixels = torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            x = pixels.float().mul_(self._scale).sub_(self._shift)
            # log_softmax of log-probabilities is a no-op, of logits it makes them so.
            return torch.log_softmax(self.network(x).float(), dim=1)

    def probabilities(self, rows: np.ndarray) -> torch.Tensor:
        return self.log_probabilities(rows).exp()

    def answers(self, probabilities: torch.Tensor, k: int) -> list[Prediction]:
        """Each row's class, probability and top ``k`` (at most the number of classes)."""
        values, indices = probabilities.topk(min(k, len(self.classes)), dim=1)
        out = []
        for vals, idx in zip(values.tolist(), indices.tolist(), strict=True):
            top = [(self.classes[i], float(v)) for v, i in zip(vals, idx, strict=True)]
            out.append(Prediction(top[0][0], top[0][1], top))
        return out

    def describe(self) -> dict[str, Any]:
        """What is served: architecture, classes and preprocessing."""
        return {
            "architecture": self.architecture,
            "classes": self.classes,
            "preprocessing": self.preprocessing.describe(),
            "max_image_pixels": self.target.max_pixels,
        }


def _read_model_file(path: Path) -> tuple[torch.nn.Module, list[str], Preprocessing, str]:
    """The network, classes, preprocessing and architecture a model.pt records, through the
    one factory (``models.load_model_file``: weights_only, digest checked)."""
    from imgpipe.models import load_model_file

    network, spec = load_model_file(path)
    # The spec's ``resize`` is process_data's record: set keys mean every image was made so.
    prep = Preprocessing(
        height=spec.input_size[0],
        width=spec.input_size[1],
        mode=spec.image_mode,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        resize=spec.resize.get("image_size") is not None,
        convert=spec.resize.get("image_mode") is not None,
    )
    return network, list(spec.classes), prep, spec.architecture


# --------------------------------------------------------------------------- where a model comes from


@dataclass(frozen=True)
class ModelSource:
    """Where the loaded model came from, as ``GET /model`` and the predictions report it."""

    uri: str  # as given: a path, models:/<name>@<alias>, models:/<name>/<n>, runs:/<id>/model
    name: str | None = None  # the registered model
    version: int | None = None
    run_id: str | None = None
    model_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def load_classifier(
    source: str,
    tracking_uri: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[Classifier, ModelSource]:
    """The model ``source`` names, loaded and checked: a model.pt (its content digest), or
    an MLflow model (every file against the digests recorded when it was logged or
    promoted; ``tracking.model_files``), downloaded into a temp folder removed after."""
    import tempfile

    from imgpipe.tracking.model_files import fetch_model, is_mlflow_uri

    if not is_mlflow_uri(source):
        return Classifier.load(source, max_image_pixels), ModelSource(source)
    from imgpipe.tracking.store import (
        check_tracking_uri,
        hide_secret_urls,
        prepare_store,
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    prepare_store(uri)
    hide_secret_urls(uri)
    with tempfile.TemporaryDirectory(prefix="imgpipe-model-") as tmp:
        fetched = fetch_model(source, uri, tmp)
        classifier = Classifier.load(fetched.model_file, max_image_pixels)
    log.info("loaded %s (%s), its files as logged", source, fetched.label)
    return classifier, ModelSource(
        source, fetched.name, fetched.version, fetched.run_id, fetched.model_id
    )
