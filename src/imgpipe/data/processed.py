"""The processed format: the only module that names its files and metadata keys.

A processed directory (``data/processed``, what ``process_data`` writes and
``train`` reads)::

    <split>_images.npy    uint8, shape (N, H, W, C), memory-mappable
    <split>_labels.npy    int64 class indices, shape (N,)
    metadata.json         classes, image shape, counts per split, how val was made,
                          normalisation stats (of train alone)

The splits are train, val and test (``SPLITS``); other raw splits are written too.

Writers create each split's images file (``create_images``) and fill its rows
themselves, then write the labels (``write_labels``) and the metadata built by
``build_metadata`` (``write_metadata``). Readers open it with ``load_processed``.
``write_subset`` cuts a smaller dataset out of a processed one (the bench's).
A change to the files or keys bumps ``FORMAT_VERSION``, so an old output is
named as such instead of read wrongly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgpipe.errors import PipelineError

METADATA_FILE = "metadata.json"
# 2: a val split (val_images.npy, val_labels.npy) and metadata's "validation" entry.
FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")


def images_file(split: str) -> str:
    return f"{split}_images.npy"


def labels_file(split: str) -> str:
    return f"{split}_labels.npy"


# --------------------------------------------------------------------------- writing


def create_images(out_dir: Path, split: str, shape: tuple[int, int, int, int]) -> tuple[str, int]:
    """Create ``split``'s images file for ``shape`` (N, H, W, C), its rows not yet written.

    Returns the file's path and the byte offset where its first row begins, so that
    workers can write their rows in place without holding a memory map open.
    """
    path = out_dir / images_file(split)
    # Creating the memory map writes the header and sizes the file.
    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset = header.offset
    del header
    return str(path), offset


def write_labels(out_dir: Path, split: str, labels: np.ndarray) -> None:
    np.save(out_dir / labels_file(split), labels)


def build_metadata(
    classes: Sequence[str],
    image_shape: Sequence[int],
    mode: str,
    class_counts: Mapping[str, Mapping[str, int]],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    validation: Mapping[str, object],
    preprocessing: Mapping[str, object] | None = None,
) -> dict:
    """The metadata document: ``image_shape`` is (C, H, W), ``class_counts`` maps each
    split to its number of images per label (labels it lacks count 0), ``validation``
    says how the val split was made, ``preprocessing`` how images were converted and
    resized (``image_size`` and ``image_mode`` null: they were not)."""
    splits = {}
    for name, counts in class_counts.items():
        per_class = {label: int(counts.get(label, 0)) for label in classes}
        splits[name] = {
            "count": sum(per_class.values()),
            "images": images_file(name),
            "labels": labels_file(name),
            "class_counts": per_class,
        }
    return {
        "format_version": FORMAT_VERSION,
        "classes": list(classes),
        "num_classes": len(classes),
        "image_shape": list(image_shape),
        "mode": mode,
        "splits": splits,
        "validation": dict(validation),
        "preprocessing": dict(preprocessing or {"image_size": None, "image_mode": None}),
        "normalization": {
            "mean": [round(float(m), 8) for m in mean],
            "std": [round(float(s), 8) for s in std],
        },
    }


def write_metadata(out_dir: Path, metadata: dict) -> None:
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W, C), usually a read-only memory map
    labels: np.ndarray  # int64 (N,)


@dataclass(frozen=True)
class ProcessedData:
    classes: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    val: Split  # for tuning: the sweep's objectives
    test: Split  # evaluated once, at the end
    # The image mode (L, RGB) and how process_data converted and resized every image (its
    # metadata's "preprocessing"): what a model trained on this data records to be fed.
    mode: str = ""
    preprocessing: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """What a run trained on, as the run's metadata.json artifact."""
        return {
            "classes": self.classes,
            "image_shape": list(self.image_shape),
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "train_count": len(self.train.labels),
            "val_count": len(self.val.labels),
            "test_count": len(self.test.labels),
        }


def _open(processed_dir: str | os.PathLike[str]) -> tuple[dict, ProcessedData]:
    """The metadata document and the arrays it describes, checked against each other."""
    root = Path(processed_dir)
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise PipelineError(
            f"processed data not found: {meta_path} (run `make process-data` or `dvc repro`)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            age = "an older" if isinstance(version, int) and version < FORMAT_VERSION else "another"
            raise PipelineError(
                f"{meta_path}: written by {age} version of process_data (format_version "
                f"{version}, this one reads {FORMAT_VERSION}); re-run process_data"
            )
        splits = {}
        for name in SPLITS:
            entry = meta["splits"][name]
            images = np.load(root / entry["images"], mmap_mode="r")
            labels = np.load(root / entry["labels"], mmap_mode="r")
            if len(images) != len(labels) or len(images) != entry["count"]:
                raise PipelineError(
                    f"{root}: {name} arrays disagree with {METADATA_FILE}; re-run process_data"
                )
            splits[name] = Split(images, labels)
        data = ProcessedData(
            classes=list(meta["classes"]),
            image_shape=tuple(meta["image_shape"]),
            mean=tuple(meta["normalization"]["mean"]),
            std=tuple(meta["normalization"]["std"]),
            train=splits["train"],
            val=splits["val"],
            test=splits["test"],
            mode=str(meta.get("mode", "")),
            preprocessing=dict(meta.get("preprocessing") or {}),
        )
        return meta, data
    except (KeyError, TypeError, json.JSONDecodeError, ValueError, OSError) as exc:
        raise PipelineError(
            f"{root}: processed data is incomplete or corrupt ({exc}); re-run process_data"
        ) from exc


def load_processed(processed_dir: str | os.PathLike[str]) -> ProcessedData:
    """Open the processed arrays memory-mapped; nothing is read until used."""
    return _open(processed_dir)[1]


def write_subset(
    processed_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_test: int,
    n_val: int | None = None,
    *,
    spread: bool = False,
) -> Path:
    """Write a processed dataset of the first ``n_train``/``n_val``/``n_test`` images of
    each split (``n_val`` None: as many as ``n_test``); ``spread``: that many images evenly
    spaced over each split instead, so a split stored class by class keeps every class.

    The normalisation stats stay the whole training set's, so a model trained on
    the subset sees its inputs scaled as on the whole.
    """
    meta, data = _open(processed_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    class_counts = {}
    cuts = (
        ("train", data.train, n_train),
        ("val", data.val, n_test if n_val is None else n_val),
        ("test", data.test, n_test),
    )
    for name, split, n in cuts:
        total = len(split.labels)
        pick = np.linspace(0, total - 1, min(n, total)).astype(int) if spread else slice(n)
        labels = np.asarray(split.labels)[pick]
        np.save(out / images_file(name), np.asarray(split.images[pick]))
        write_labels(out, name, labels)
        per_class = np.bincount(labels, minlength=len(data.classes))
        class_counts[name] = dict(zip(data.classes, per_class, strict=True))
    write_metadata(
        out,
        build_metadata(
            data.classes,
            data.image_shape,
            meta["mode"],
            class_counts,
            data.mean,
            data.std,
            validation=meta["validation"],
            preprocessing=meta.get("preprocessing"),
        ),
    )
    return out
