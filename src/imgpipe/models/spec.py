"""``ModelSpec``: everything needed to rebuild a trained model and feed it an image.

model.pt and the MLflow model carry it (``to_dict``); ``imgpipe.models.build_model``
turns it back into the network. It is plain data (str, int, float, lists, dicts), so
``weights_only`` loading and JSON both take it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from imgpipe.errors import PipelineError

CONVNET = "convnet"
# The format of the dict ``to_dict`` writes; a reader refuses a newer one.
SPEC_FORMAT = 1


@dataclass(frozen=True)
class ModelSpec:
    """What a model is and what its input must look like.

    ``architecture``: ``convnet`` (the seed's CNN) or a timm architecture name.
    ``classes``: the class names in output order (index i of the output is ``classes[i]``).
    ``in_chans`` x ``input_size`` (height, width): the tensor the network takes, made from
    an image converted to ``image_mode`` (``L`` or ``RGB``) and resized as ``resize`` says.
    ``mean``/``std``: per channel, on pixels scaled to [0, 1]: ``(x / 255 - mean) / std``.
    ``resize``: how process_data made every image ``input_size`` (its ``preprocessing``
    record: ``image_size``, ``image_mode``, ``resize_filter``, ...); ``image_size`` null
    means images were used as they were, so an input must already have ``input_size``.
    ``weights_sha256``/``weights_file``: the file training started from (null: random).
    Outputs are log-probabilities, shape (N, num_classes), for every architecture.
    """

    architecture: str
    classes: tuple[str, ...]
    in_chans: int
    input_size: tuple[int, int]
    image_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None
    weights_file: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W), as the processed data names it."""
        return (self.in_chans, *self.input_size)

    @property
    def identity(self) -> str:
        """The name the checkpoint fingerprint uses: the architecture and where its
        weights came from (the seed CNN from scratch keeps its old name)."""
        from imgpipe.models.convnet import CONVNET_ID

        name = CONVNET_ID if self.architecture == CONVNET else f"timm:{self.architecture}"
        return f"{name}@sha256:{self.weights_sha256}" if self.weights_sha256 else name

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            format=SPEC_FORMAT,
            classes=list(self.classes),
            input_size=list(self.input_size),
            mean=list(self.mean),
            std=list(self.std),
            num_classes=self.num_classes,
        )
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "model file") -> ModelSpec:
        """The spec a ``to_dict`` wrote; PipelineError naming ``source`` and what is wrong."""
        if not isinstance(data, dict):
            raise PipelineError(f"{source}: no model description")
        if int(data.get("format", 1)) > SPEC_FORMAT:
            raise PipelineError(
                f"{source}: model description format {data['format']} is newer than this "
                f"imgpipe reads ({SPEC_FORMAT}); update imgpipe"
            )
        try:
            return cls(
                architecture=str(data["architecture"]),
                classes=tuple(str(c) for c in data["classes"]),
                in_chans=int(data["in_chans"]),
                input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
                image_mode=str(data["image_mode"]),
                mean=tuple(float(m) for m in data["mean"]),
                std=tuple(float(s) for s in data["std"]),
                resize=dict(data.get("resize") or {}),
                weights_sha256=data.get("weights_sha256"),
                weights_file=data.get("weights_file"),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PipelineError(f"{source}: model description lacks or mangles {exc}") from exc


def image_mode_for(in_chans: int) -> str:
    """The image mode whose pixels make ``in_chans`` channels."""
    return {1: "L", 3: "RGB"}.get(in_chans, f"{in_chans}-channel")
