"""The raw layout users bring: find its splits, read and validate their listings.

Each split is listed by its ``<split>.csv`` (``filepath,label`` rows, authoritative) or,
without one, by its folder: every image under ``<split>/<label>/``, the folder naming the
label (torchvision's ImageFolder layout). Validation happens here, once, before any
pixel is decoded: every error names the file and line at fault, and nothing is written.
What may be read at all (regular files inside the dataset, links into DVC's cache) is
decided by ``files.DatasetGuard`` while the folders are listed, from the directory
entries and without opening anything. Files of other formats in class folders (a
``.gif`` among the photos) are counted and reported once (``unsupported_files``:
``skip`` says so, ``error`` refuses).
"""

from __future__ import annotations

import csv
import logging
import os
import stat
from array import array
from dataclasses import dataclass
from pathlib import Path

from imgpipe.data.files import IMAGE_SUFFIXES, DatasetGuard, Unsupported, unusable_char
from imgpipe.errors import PipelineError

# One logger name for the whole data stage, as its log lines have always carried.
log = logging.getLogger("imgpipe.data")

REQUIRED_SPLITS = ("train", "test")

# The splits a folder without a CSV stands for; with CSVs, any <split>.csv is a split.
LAYOUT_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RawSplit:
    """One split's rows, stored compactly (a label code per row, not a string): a split
    may list millions of images, and the parent process holds all of its rows.

    Row ``i`` is the image ``<root>/<folder>/<label_names[codes[i]]>/<files[i]>``; the
    folder is the split's name unless the split was carved out of another (val from train).
    """

    name: str
    root: str
    label_names: list[str]  # distinct labels, in order of first appearance
    codes: array  # per row: index into label_names
    files: list[str]  # per row: the file name inside its class folder
    folder: str = ""  # the split's folder under root; empty: its name

    def __post_init__(self) -> None:
        if not self.folder:
            object.__setattr__(self, "folder", self.name)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.folder, self.label_names[self.codes[i]], self.files[i])

    def paths(self, start: int, stop: int) -> list[str]:
        folders = [os.path.join(self.root, self.folder, label) for label in self.label_names]
        return [
            os.path.join(folders[code], name)
            for code, name in zip(self.codes[start:stop], self.files[start:stop], strict=True)
        ]


def _scan_folder(
    guard: DatasetGuard, folder: str, unsupported: Unsupported | None = None
) -> tuple[set[str], dict[str, str]]:
    """A class folder's image file names that may be read, and why the others may not;
    files of other formats go into ``unsupported`` when given.

    A regular file in a folder that is inside the dataset is inside too: its directory
    entry says so without a ``stat``. Only links are resolved.
    """
    readable: set[str] = set()
    refused: dict[str, str] = {}
    with os.scandir(folder) as images:
        for e in images:
            if not e.name.lower().endswith(IMAGE_SUFFIXES):
                if (
                    unsupported is not None
                    and not e.name.startswith(".")
                    and not e.is_dir(follow_symlinks=False)
                ):
                    unsupported.add(folder, e.name)
                continue
            if e.is_file(follow_symlinks=False):
                readable.add(e.name)
                continue
            why = guard.link_refusal(e.path) if e.is_symlink() else "is not a regular file"
            if why is None:
                readable.add(e.name)
            else:
                refused[e.name] = why
    return readable, refused


def _scan_split(
    guard: DatasetGuard, split_dir: Path, unsupported: Unsupported | None = None
) -> tuple[dict[str, set[str]], dict[str, dict[str, str]]]:
    """Image file names per class folder of one split, readable and refused.

    Links are not followed out of the dataset: a split or class folder that leads
    outside is refused before it is listed.
    """
    found: dict[str, set[str]] = {}
    refused: dict[str, dict[str, str]] = {}
    if split_dir.is_symlink() and (why := guard.folder_refusal(str(split_dir))):
        raise PipelineError(f"folder {split_dir} {why}")
    if not split_dir.is_dir():
        return found, refused
    with os.scandir(split_dir) as classes:
        for entry in classes:
            if entry.is_symlink():
                if not entry.is_dir():  # follows the link: a stat, which never blocks
                    continue
                why = guard.folder_refusal(entry.path)
                if why:
                    raise PipelineError(f"class folder {entry.path} {why}")
            elif not entry.is_dir(follow_symlinks=False):
                continue
            found[entry.name], refused[entry.name] = _scan_folder(
                guard, entry.path, None if entry.name.startswith(".") else unsupported
            )
    return found, refused


def _undecodable_line(csv_path: Path) -> str:
    """`` line N``: the first line of ``csv_path`` that is not UTF-8 (for the message)."""
    try:
        with open(csv_path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f" line {number}"
    except OSError:
        pass
    return ""


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def sort_labels(labels: set[str]) -> list[str]:
    """Numeric labels in numeric order (2 before 10), anything else alphabetically."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _read_split_csv(guard: DatasetGuard, raw_dir: Path, csv_path: Path) -> RawSplit:
    """Validate one split's CSV row by row as it streams in (no copy of the rows is kept).

    One directory scan replaces a stat per row; each listed file is taken out of the scan's
    sets, so what remains is the unlisted files and a second listing is a duplicate.
    """
    split = csv_path.stem
    root = str(raw_dir)
    on_disk, refused = _scan_split(guard, raw_dir / split)
    empty_folders = [
        label for label, names in sorted(on_disk.items()) if not names and not refused[label]
    ]
    label_code: dict[str, int] = {}
    codes = array("i")
    files: list[str] = []
    try:
        why = guard.file_refusal(str(csv_path))
        if why:
            raise PipelineError(f"{csv_path} {why}")
        # utf-8-sig: Excel's "CSV UTF-8" starts the file with a byte-order mark.
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            fields = [f.strip() for f in next(reader, [])]
            if "filepath" not in fields or "label" not in fields:
                raise PipelineError(
                    f"{csv_path}: header must contain 'filepath,label' (found {','.join(fields)!r})"
                )
            at_path, at_label = fields.index("filepath"), fields.index("label")
            width = max(at_path, at_label) + 1
            for row in reader:
                line = reader.line_num  # the row's (last) physical line
                rel, label = (
                    (row[at_path].strip(), row[at_label].strip()) if len(row) >= width else ("", "")
                )
                if not rel or not label:
                    raise PipelineError(f"{csv_path} line {line}: empty filepath or label")
                for key, value in (("filepath", rel), ("label", label)):
                    if bad := unusable_char(value):
                        raise PipelineError(
                            f"{csv_path} line {line}: {key} {value!r} holds {bad}, "
                            "which no file or label name here may hold"
                        )
                parts = rel.split("/")
                if rel.startswith("/") or ".." in parts:
                    raise PipelineError(
                        f"{csv_path} line {line}: filepath {rel!r} points outside {raw_dir}"
                    )
                if len(parts) != 3 or parts[0] != split:
                    raise PipelineError(
                        f"{csv_path} line {line}: filepath {rel!r} is not of the form "
                        f"{split}/<label>/<file>"
                    )
                if parts[1] != label:
                    raise PipelineError(
                        f"{csv_path} line {line}: label {label!r} disagrees with its folder "
                        f"{parts[0]}/{parts[1]}/"
                    )
                unlisted = on_disk.get(label)
                name = parts[2]
                if unlisted is None or name not in unlisted:
                    path = os.path.join(root, rel)
                    why = refused.get(label, {}).get(name)
                    if why:
                        raise PipelineError(f"{csv_path} line {line}: {path} {why}")
                    if not name.lower().endswith(IMAGE_SUFFIXES):
                        raise PipelineError(
                            f"{csv_path} line {line}: {path}: unsupported image format "
                            f"(supported: {', '.join(IMAGE_SUFFIXES)})"
                        )
                    if _is_regular(path):
                        raise PipelineError(f"{csv_path} line {line}: duplicate filepath {rel!r}")
                    raise PipelineError(f"{csv_path} line {line}: image file not found: {path}")
                unlisted.remove(name)
                code = label_code.setdefault(label, len(label_code))
                codes.append(code)
                files.append(name)
    except UnicodeDecodeError as exc:
        where = _undecodable_line(csv_path)
        raise PipelineError(
            f"{csv_path}{where}: not a UTF-8 CSV file ({exc.reason}); save it as CSV UTF-8"
        ) from exc
    except csv.Error as exc:
        raise PipelineError(f"{csv_path}: malformed CSV ({exc})") from exc
    if not files:
        raise PipelineError(f"{csv_path}: no rows; every split needs at least one image")

    # A class folder with no images is almost always a failed copy: say so.
    if empty_folders:
        raise PipelineError(f"class folder {raw_dir / split / empty_folders[0]} has no images")
    unlisted_count = sum(len(names) for names in on_disk.values()) + sum(
        len(names) for names in refused.values()
    )
    if unlisted_count > 0:
        log.warning(
            "%d image(s) under %s are not listed in %s; ignored",
            unlisted_count,
            raw_dir / split,
            csv_path,
        )
    return RawSplit(split, root, list(label_code), codes, files)


def _list_split_folder(
    guard: DatasetGuard, raw_dir: Path, split: str, unsupported: Unsupported | None = None
) -> RawSplit:
    """List every image under ``<split>/<label>/`` (the ImageFolder layout, no CSV): the
    folder names the label; rows in the order of their sorted relative paths, so the same
    files give the same rows on every machine. Hidden entries (``.ipynb_checkpoints``,
    ``.DS_Store``) are skipped;
    files of other formats beside the images go into ``unsupported``."""
    split_dir = raw_dir / split
    on_disk, refused = _scan_split(guard, split_dir, unsupported)
    labels = sorted(label for label in on_disk if not label.startswith("."))
    for label in labels:
        for name, why in sorted(refused[label].items()):
            if not name.startswith("."):
                raise PipelineError(f"{split_dir / label / name} {why}")
        if not any(not name.startswith(".") for name in on_disk[label]):
            raise PipelineError(f"class folder {split_dir / label} has no images")
    if not labels:
        raise PipelineError(
            f"{split_dir}: no class folders; expected {split}/<label>/<image> or a {split}.csv"
        )
    rows = sorted(
        f"{label}/{name}" for label in labels for name in on_disk[label] if not name.startswith(".")
    )
    label_code: dict[str, int] = {}
    codes = array("i")
    files: list[str] = []
    for rel in rows:
        label, name = rel.split("/", 1)
        codes.append(label_code.setdefault(label, len(label_code)))
        files.append(name)
    return RawSplit(split, str(raw_dir), list(label_code), codes, files)


def split_source(raw_dir: Path, split: str) -> Path:
    """What lists a split's images: its CSV when there is one, else its folder."""
    csv_path = raw_dir / f"{split}.csv"
    return csv_path if csv_path.exists() or csv_path.is_symlink() else raw_dir / split


def read_raw_dataset(
    raw_dir: str | os.PathLike[str], unsupported_files: str = "skip"
) -> dict[str, RawSplit]:
    """Read and validate every split of ``raw_dir``; train and test are required.

    A split is listed by its ``<split>.csv`` when there is one (authoritative: only its
    rows are read, and a listed file of another format is an error), else by its folder
    (``train``, ``val`` and ``test`` only), each split on its own: a dataset may bring
    train.csv and a bare test/ folder. Files of other formats in the class folders of a
    folder-listed split are reported once, or refused (``unsupported_files``: skip, error).
    """
    if unsupported_files not in Unsupported.POLICIES:
        raise PipelineError(
            f"unsupported_files={unsupported_files!r}: expected one of {', '.join(Unsupported.POLICIES)}"
        )
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise PipelineError(f"raw data directory not found: {raw} (run `make data` for the sample)")
    names = {p.stem for p in raw.glob("*.csv")}
    names |= {s for s in LAYOUT_SPLITS if (raw / s).is_dir()}
    if not names:
        what = "is empty" if not any(raw.iterdir()) else "has no splits"
        raise PipelineError(
            f"raw data directory {raw} {what}: expected train/<label>/<image> and "
            f"test/<label>/<image> folders, or train.csv and test.csv"
        )
    missing = [s for s in REQUIRED_SPLITS if s not in names]
    if missing:
        raise PipelineError(
            f"raw data directory {raw}: missing "
            + ", ".join(f"{s} (a {s}/<label>/ folder or {s}.csv)" for s in missing)
        )
    guard = DatasetGuard(raw)
    unsupported = Unsupported()
    splits = {}
    for name in sorted(names):
        source = split_source(raw, name)
        if source.suffix == ".csv":
            splits[name] = _read_split_csv(guard, raw, source)
        else:
            splits[name] = _list_split_folder(guard, raw, name, unsupported)
    unsupported.report(unsupported_files)
    train_classes = set(splits["train"].label_names)
    for name, split in splits.items():
        extra = set(split.label_names) - train_classes
        if extra:
            raise PipelineError(
                f"{split_source(raw, name)}: label(s) {sorted(extra)} never appear in "
                f"{split_source(raw, 'train')}"
            )
    return splits
