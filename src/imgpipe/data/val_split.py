"""The validation split: the raw dataset's own ``val`` split, or one carved from train.

The sweep tunes on val and the test set is evaluated once, at the end, so the reported
test numbers are not chosen on the test set. When the raw data has no ``val`` split,
one is carved out of train:

- stratified: each class gives ``val_fraction`` of its training images, rounded half up,
  but at least one and never all of them (a class with a single training image keeps
  it in train, so val lacks that class rather than train);
- deterministic: within a class, images are ordered by the SHA-256 of
  ``VAL_KEY + ":" + <path relative to the raw root>`` (``train/<label>/<file>``,
  forward slashes) and the first ones go to val. No library RNG takes part, and the
  choice depends on neither the listing order nor the machine: the same files give the
  same split everywhere, and adding images to a class moves none of the others' into
  or out of val except by the change in its count.

Both carved parts keep the rows in train's listing order.
"""

from __future__ import annotations

import hashlib
import math
from array import array

from imgpipe.data.raw import RawSplit
from imgpipe.errors import PipelineError

VAL_SPLIT = "val"
VAL_KEY = "imgpipe-val"  # changing it re-draws every carved split: bump FORMAT_VERSION


def val_count(n: int, fraction: float) -> int:
    """How many of a class's ``n`` training images go to val."""
    if n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))


def path_key(rel_path: str) -> bytes:
    """The hash that orders a training image for the carve (``rel_path`` as in the docstring);
    its bytes sort as its hex digest does."""
    return hashlib.sha256(f"{VAL_KEY}:{rel_path}".encode()).digest()


def carve_val(train: RawSplit, fraction: float) -> tuple[RawSplit, RawSplit]:
    """Split ``train`` into (train, val) as the module docstring says."""
    by_class: dict[int, list[tuple[bytes, int]]] = {}
    for i, (code, name) in enumerate(zip(train.codes, train.files, strict=True)):
        rel = f"{train.folder}/{train.label_names[code]}/{name}"
        by_class.setdefault(code, []).append((path_key(rel), i))
    to_val: set[int] = set()
    for members in by_class.values():
        members.sort()
        to_val.update(i for _, i in members[: val_count(len(members), fraction)])
    if not to_val:
        raise PipelineError(
            f"{train.root}/{train.folder}: no class has two training images, so no validation "
            f"split can be carved from it; add a {VAL_SPLIT} split to the raw data"
        )

    def part(name: str, in_val: bool) -> RawSplit:
        rows = [i for i in range(len(train)) if (i in to_val) == in_val]
        return RawSplit(
            name,
            train.root,
            train.label_names,
            array(train.codes.typecode, (train.codes[i] for i in rows)),
            [train.files[i] for i in rows],
            folder=train.folder,
        )

    return part(train.name, False), part(VAL_SPLIT, True)


def describe_carve(fraction: float) -> dict:
    """How a carved val split was made, for metadata.json."""
    return {
        "source": "carved from train",
        "fraction": fraction,
        "rule": "per class: round-half-up(n * fraction), at least 1, at most n - 1; none if n < 2",
        "order": f"sha256('{VAL_KEY}:' + path relative to the raw root), smallest first",
    }


def describe_raw() -> dict:
    return {"source": f"the raw data's own {VAL_SPLIT} split"}
