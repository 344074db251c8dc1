"""The ``predict`` stage: a folder of new images classified by a trained model.

    make predict                                   # predict_input (data/raw/test) with models/model.pt
    imgpipe predict predict_input=new/ predict_model=models:/digits@champion

``predict_input`` is a folder in either raw layout: ``<label>/<image>`` (labels known),
listed by ``<folder>.csv`` beside it when there is one (``data/raw/test`` with
``data/raw/test.csv``), or images straight inside it (no labels); both may mix. Files are
read as ``process_data`` reads them (``data.files``: regular files inside the folder or
DVC's cache, the extension names the decoder, the pixel budget before decoding) and
decoded on all cores while the model classifies the previous batch. ``predict_model`` is
a model.pt or an MLflow model (``models:/<name>@<alias>``, ``models:/<name>/<version>``,
``runs:/<run id>/model``), checked against its digests before it is loaded.

Writes ``predict_output_dir`` (default ``predictions/``) whole or not at all:

    predictions.csv        path, prediction, probability, top1..topk (+ _probability), label
    errors.csv             path, error: each file that could not be read, and why
    metrics.json           images, predicted, errors; with labels: accuracy, loss,
                           per-class precision / recall / support
    confusion_matrix.json  (actual, predicted) pairs, for `dvc plots`; and its PNG

A file that cannot be read is an ``errors.csv`` row and the others are still predicted;
when none can be read the stage stops with one line (exit 2) and writes nothing.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgpipe.atomic import atomic_dir
from imgpipe.cpus import available_cpus
from imgpipe.data.files import IMAGE_SUFFIXES, DatasetGuard
from imgpipe.data.process import Target, _decode_pixels
from imgpipe.data.raw import _read_split_csv, _scan_folder, _scan_split
from imgpipe.errors import PipelineError

if TYPE_CHECKING:
    from imgpipe.inference import Classifier

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
ERRORS_FILE = "errors.csv"
METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion_matrix.json"


# --------------------------------------------------------------------------- what to read


@dataclass
class Inputs:
    """The images of ``root`` to classify (path, label or None) and those refused unread."""

    root: Path
    items: list[tuple[str, str | None]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return any(label is not None for _, label in self.items)


def list_inputs(folder: str | os.PathLike[str]) -> Inputs:
    """The images under ``folder``, in a fixed order (sorted paths, or the CSV's rows)."""
    root = Path(folder)
    if not root.is_dir():
        raise PipelineError(f"predict_input {root}: not a folder of images")
    found = Inputs(root)
    listing = root.parent / f"{root.name}.csv"
    if listing.is_file():
        # The raw layout's CSV is authoritative, as for process_data: its rows, its labels.
        split = _read_split_csv(DatasetGuard(root.parent), root.parent, listing)
        found.items = [
            (split.path(i), split.label_names[split.codes[i]]) for i in range(len(split))
        ]
        return found
    guard = DatasetGuard(root)
    flat, flat_refused = _scan_folder(guard, str(root))
    classes, classes_refused = _scan_split(guard, root)
    rows: list[tuple[str, str | None]] = [(name, None) for name in flat]
    refused = [(name, why) for name, why in flat_refused.items()]
    for label, names in classes.items():
        if label.startswith("."):
            continue
        rows += [(f"{label}/{name}", label) for name in names]
        refused += [(f"{label}/{name}", why) for name, why in classes_refused[label].items()]
    visible = lambda rel: not os.path.basename(rel).startswith(".")  # noqa: E731
    found.items = [(str(root / rel), label) for rel, label in sorted(rows) if visible(rel)]
    found.refused = [(str(root / rel), f"{root / rel} {why}") for rel, why in sorted(refused)]
    found.refused = [r for r in found.refused if visible(r[0])]
    if not found.items and not found.refused:
        raise PipelineError(
            f"predict_input {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its "
            "<label>/ folders"
        )
    return found


# --------------------------------------------------------------------------- decoding


def decode_rows(
    paths: list[str], target: Target
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Decode ``paths`` into rows (N ok, H, W, C) uint8: the rows, the indices that
    decoded, and (index, reason) for those that did not. Runs in a worker process."""
    width, height = target.size
    channels = 1 if target.mode == "L" else 3
    rows = np.empty((len(paths), height, width, channels), np.uint8)
    ok: list[int] = []
    failed: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        row = rows[len(ok)]
        try:
            pixels = _decode_pixels(path, target, row)
        except PipelineError as exc:
            failed.append((i, str(exc)))
            continue
        except OSError as exc:  # vanished or unreadable since it was listed
            failed.append((i, f"{path}: cannot be read ({exc.strerror})"))
            continue
        if pixels is not None:
            row.reshape(-1)[:] = np.frombuffer(pixels, np.uint8)
        ok.append(i)
    return rows[: len(ok)], ok, failed


def decoded_batches(
    paths: list[str], target: Target, batch_size: int, workers: int
) -> Iterator[tuple[int, tuple[np.ndarray, list[int], list[tuple[int, str]]]]]:
    """(first index, decode_rows(...)) per batch, in order. With several workers the next
    batches decode in other processes while the caller classifies this one."""
    starts = range(0, len(paths), batch_size)
    if workers <= 1 or len(paths) <= batch_size:
        for start in starts:
            yield start, decode_rows(paths[start : start + batch_size], target)
        return
    # Batches of batch_size split into pieces, so every core has work even for one batch.
    piece = max(16, math.ceil(batch_size / workers))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        window: list[tuple[int, list[Future]]] = []
        pending = iter(starts)

        def submit() -> None:
            for start in pending:
                stop = min(start + batch_size, len(paths))
                futures = [
                    pool.submit(decode_rows, paths[a : min(a + piece, stop)], target)
                    for a in range(start, stop, piece)
                ]
                window.append((start, futures))
                return

        for _ in range(3):  # up to three batches in flight: memory stays flat
            submit()
        try:
            while window:
                start, futures = window.pop(0)
                parts = [f.result() for f in futures]
                submit()
                rows = np.concatenate([p[0] for p in parts])
                ok, failed = [], []
                for (_, part_ok, part_failed), offset in zip(
                    parts, range(0, batch_size, piece), strict=False
                ):
                    ok += [offset + i for i in part_ok]
                    failed += [(offset + i, why) for i, why in part_failed]
                yield start, (rows, ok, failed)
        except BaseException:
            for _, futures in window:
                for f in futures:
                    f.cancel()
            raise


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class PredictResult:
    images: int
    predicted: int
    errors: int
    accuracy: float | None
    output_dir: Path


def predict_folder(
    classifier: Classifier,
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    top_k: int = 3,
    batch_size: int = 256,
    num_workers: int = 0,
    model_name: str = "",
) -> PredictResult:
    """Classify every image of ``input_dir`` into ``output_dir`` (see the module's doc)."""
    import torch

    inputs = list_inputs(input_dir)
    paths = [p for p, _ in inputs.items]
    workers = num_workers if num_workers > 0 else available_cpus()
    log.info(
        "predicting %d image(s) under %s with %s (%d decoding worker(s))",
        len(paths),
        input_dir,
        model_name or classifier.architecture,
        workers,
    )
    errors = list(inputs.refused)
    answered: list[tuple[int, Any]] = []  # (index into items, Prediction)
    log_probs: list[torch.Tensor] = []
    for start, (rows, ok, failed) in decoded_batches(paths, classifier.target, batch_size, workers):
        errors += [(paths[start + i], why) for i, why in failed]
        if not ok:
            continue
        scores = classifier.log_probabilities(rows)
        log_probs.append(scores)
        for i, answer in zip(ok, classifier.answers(scores.exp(), top_k), strict=True):
            answered.append((start + i, answer))
    for _, why in errors:
        log.warning("not predicted: %s", why)
    if not answered:
        raise PipelineError(
            f"predict_input {input_dir}: none of its {len(paths) + len(inputs.refused)} "
            f"image(s) could be read (first: {errors[0][1] if errors else 'none'})"
        )
    scores = torch.cat(log_probs)
    metrics = _metrics(classifier, inputs, answered, scores, len(errors))
    k = min(top_k, len(classifier.classes))
    with atomic_dir(output_dir) as tmp:
        _write_predictions(tmp / PREDICTIONS_FILE, inputs, answered, k)
        _write_errors(tmp / ERRORS_FILE, errors)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        if inputs.labelled:
            _write_confusion(tmp, inputs, answered)
    log.info(
        "wrote %s: %d predicted, %d not readable%s",
        output_dir,
        len(answered),
        len(errors),
        f", accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else "",
    )
    return PredictResult(
        len(paths) + len(inputs.refused),
        len(answered),
        len(errors),
        metrics.get("accuracy"),
        Path(output_dir),
    )


def _metrics(
    classifier: Classifier,
    inputs: Inputs,
    answered: list[tuple[int, Any]],
    scores: Any,
    errors: int,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    metrics: dict[str, Any] = {
        "images": len(inputs.items) + len(inputs.refused),
        "predicted": len(answered),
        "errors": errors,
    }
    labelled = [(n, i) for n, (i, _) in enumerate(answered) if inputs.items[i][1] is not None]
    if not labelled:
        return metrics
    index = {c: i for i, c in enumerate(classifier.classes)}
    actual = [inputs.items[answered[n][0]][1] for n, _ in labelled]
    predicted = [answered[n][1].prediction for n, _ in labelled]
    hits = sum(a == p for a, p in zip(actual, predicted, strict=True))
    metrics["labelled"] = len(labelled)
    metrics["accuracy"] = hits / len(labelled)
    known = [(n, index[a]) for (n, _), a in zip(labelled, actual, strict=True) if a in index]
    if known:
        rows = torch.tensor([n for n, _ in known])
        targets = torch.tensor([c for _, c in known])
        metrics["loss"] = F.nll_loss(scores[rows], targets).item()
    per_class = {}
    for name in sorted(set(classifier.classes) | set(actual), key=_class_order(classifier)):
        tp = sum(a == name and p == name for a, p in zip(actual, predicted, strict=True))
        said = sum(p == name for p in predicted)
        support = sum(a == name for a in actual)
        per_class[name] = {
            "precision": tp / said if said else 0.0,
            "recall": tp / support if support else 0.0,
            "support": support,
        }
    metrics["per_class"] = per_class
    return metrics


def _class_order(classifier: Classifier) -> Any:
    order = {c: i for i, c in enumerate(classifier.classes)}
    return lambda name: (order.get(name, len(order)), name)


def _write_predictions(path: Path, inputs: Inputs, answered: list[tuple[int, Any]], k: int) -> None:
    header = ["path", "prediction", "probability"]
    for i in range(1, k + 1):
        header += [f"top{i}", f"top{i}_probability"]
    if inputs.labelled:
        header.append("label")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, answer in answered:
            row: list[Any] = [inputs.items[i][0], answer.prediction, f"{answer.probability:.6f}"]
            for name, p in answer.top_k:
                row += [name, f"{p:.6f}"]
            if inputs.labelled:
                row.append(inputs.items[i][1] or "")
            writer.writerow(row)


def _write_errors(path: Path, errors: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "error"])
        writer.writerows(sorted(errors))


def _write_confusion(out: Path, inputs: Inputs, answered: list[tuple[int, Any]]) -> None:
    from imgpipe.plots import VEGA_LITE, confusion_spec

    pairs = [
        {"actual": inputs.items[i][1], "predicted": answer.prediction}
        for i, answer in answered
        if inputs.items[i][1] is not None
    ]
    (out / CONFUSION_FILE).write_text(json.dumps(pairs) + "\n", encoding="utf-8")
    import vl_convert

    spec = confusion_spec("confusion matrix (predict)", pairs)
    (out / "confusion_matrix.png").write_bytes(
        vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE, scale=1)
    )


def run_predict(cfg: Any) -> PredictResult:
    """The stage as configured (``config.PredictConfig``): load the model, predict the folder."""
    from imgpipe.inference import load_classifier

    classifier, source = load_classifier(
        cfg.predict_model, _tracking_uri(cfg.predict_model), cfg.predict_max_image_pixels
    )
    return predict_folder(
        classifier,
        cfg.predict_input,
        cfg.predict_output_dir,
        top_k=cfg.predict_top_k,
        batch_size=cfg.predict_batch_size,
        num_workers=cfg.predict_num_workers,
        model_name=source.uri,
    )


def _tracking_uri(model: str) -> str | None:
    """The training's tracking store (conf/train_model.yaml < params file), for an MLflow
    model; None for a file."""
    from imgpipe.tracking.model_files import is_mlflow_uri

    if not is_mlflow_uri(model):
        return None
    from imgpipe.compose import load_stage_config

    return load_stage_config("train_model").mlflow_tracking_uri
