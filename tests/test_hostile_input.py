"""Hostile or odd files in a raw dataset, through the real process_data entry point.

Each refusal is one line naming the file, exit 2, the earlier output intact, and never a
hang (every run has a timeout); what DVC itself creates (links into its cache) and what
Excel writes (a CSV with a byte-order mark) is accepted.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import error_lines, tree_digest
from imgpipe.data import process_dataset
from imgpipe.testing import dvc, run_script

# A run that hangs (a FIFO opened) fails the test instead of the suite.
TIMEOUT = 120


def process(raw: Path, out: Path, cwd: Path, *overrides: str, env: dict | None = None):
    return run_script(
        "process_data.py",
        f"raw_data_dir_path={raw}",
        f"processed_data_dir_path={out}",
        f"log_dir={cwd / 'logs'}",
        "num_workers=2",
        *overrides,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, followed by a few
    rows of data: as much as a decoder needs to start allocating for the whole image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = zlib.compress(b"\0" * (width + 1) * 4)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _listed(raw: Path, split: str, label: str, last: bool = True) -> Path:
    files = sorted((raw / split / label).glob("*.png"))
    return files[-1] if last else files[0]


def _a_good_image(path: Path) -> None:
    Image.fromarray(np.full((6, 6), 7, dtype=np.uint8)).save(path)


# --------------------------------------------------------------------------- damages


def _bomb_first(raw: Path, tmp: Path) -> str:
    target = _listed(raw, "train", "ant", last=False)  # train.csv's first row: the reference
    target.write_bytes(_png_header_only(20000, 20000))
    return str(target)


def _bomb_later(raw: Path, tmp: Path) -> str:
    target = _listed(raw, "test", "cat")
    target.write_bytes(_png_header_only(20000, 20000))
    return str(target)


def _over_configured_limit(raw: Path, tmp: Path) -> str:
    return str(_listed(raw, "train", "ant", last=False))  # 6x6 = 36 pixels > 35


def _eps_named_png(raw: Path, tmp: Path) -> str:
    target = _listed(raw, "train", "bee")
    target.write_text(
        "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 6 6\n"
        "newpath 0 0 moveto 6 6 lineto stroke\nshowpage\n%%EOF\n"
    )
    return str(target)


def _bmp_named_png(raw: Path, tmp: Path) -> str:
    target = _listed(raw, "train", "cat")
    Image.open(target).save(target, format="BMP")
    return str(target)


def _link_out_of_dataset(raw: Path, tmp: Path) -> str:
    target = _listed(raw, "train", "cat")
    _a_good_image(tmp / "outside.png")
    target.unlink()
    target.symlink_to(tmp / "outside.png")
    return str(target)


def _link_to_fifo_outside(raw: Path, tmp: Path) -> str:
    target = _listed(raw, "test", "bee")
    os.mkfifo(tmp / "outside.png")
    target.unlink()
    target.symlink_to(tmp / "outside.png")
    return str(target)


def _link_to_fifo_inside(raw: Path, tmp: Path) -> str:
    target = _listed(raw, "test", "bee")
    os.mkfifo(raw / "test" / "pipe")
    target.unlink()
    target.symlink_to("../pipe")
    return str(target)


def _fifo_named_png(raw: Path, tmp: Path) -> str:
    target = _listed(raw, "train", "ant")
    target.unlink()
    os.mkfifo(target)
    return str(target)


def _folder_named_png(raw: Path, tmp: Path) -> str:
    target = _listed(raw, "train", "ant")
    target.unlink()
    target.mkdir()
    return str(target)


def _csv_is_a_fifo(raw: Path, tmp: Path) -> str:
    target = raw / "test.csv"
    target.unlink()
    os.mkfifo(target)
    return str(target)


def _class_folder_out_of_dataset(raw: Path, tmp: Path) -> str:
    target = raw / "train" / "cat"
    shutil.move(target, tmp / "cat")
    target.symlink_to(tmp / "cat", target_is_directory=True)
    return str(target)


def _split_folder_out_of_dataset(raw: Path, tmp: Path) -> str:
    target = raw / "test"
    shutil.move(target, tmp / "test")
    target.symlink_to(tmp / "test", target_is_directory=True)
    return str(target)


def _edit_csv_line(raw: Path, number: int, change) -> str:
    """Change line ``number`` (1: the header) of train.csv; the culprit it names."""
    csv = raw / "train.csv"
    lines = csv.read_bytes().split(b"\n")
    lines[number - 1] = change(lines[number - 1])
    csv.write_bytes(b"\n".join(lines))
    return f"{csv} line {number}"


def _nul_in_csv_path(raw: Path, tmp: Path) -> str:
    return _edit_csv_line(raw, 3, lambda line: line.replace(b".png", b"\x00.png"))


def _escape_in_csv_label(raw: Path, tmp: Path) -> str:
    return _edit_csv_line(raw, 4, lambda line: line + b"\x1b[31m")


def _newline_in_quoted_csv_path(raw: Path, tmp: Path) -> str:
    def quoted(line: bytes) -> bytes:
        path, label = line.split(b",")
        return b'"' + path.replace(b".png", b"\n.png") + b'",' + label

    _edit_csv_line(raw, 2, quoted)
    return f"{raw / 'train.csv'} line 3"  # the row ends on the line after the break


def _latin1_byte_in_csv(raw: Path, tmp: Path) -> str:
    return _edit_csv_line(raw, 5, lambda line: line.replace(b".png", b"\xe9.png"))


@pytest.mark.parametrize(
    ("damage", "expected", "overrides"),
    [
        pytest.param(_nul_in_csv_path, "U+0000 at position", (), id="csv-path-with-nul"),
        pytest.param(_escape_in_csv_label, "label", (), id="csv-label-with-escape"),
        pytest.param(_newline_in_quoted_csv_path, "U+000A", (), id="csv-path-with-newline"),
        pytest.param(_latin1_byte_in_csv, "not a UTF-8 CSV file", (), id="csv-not-utf8"),
        pytest.param(
            _bomb_first, "more than max_image_pixels=89478485", (), id="header-bomb-first"
        ),
        pytest.param(
            _bomb_later, "more than max_image_pixels=89478485", (), id="header-bomb-later"
        ),
        pytest.param(
            _over_configured_limit,
            "6x6 = 36 pixels, more than max_image_pixels=35",
            ("max_image_pixels=35",),
            id="over-configured-limit",
        ),
        pytest.param(_eps_named_png, "cannot decode image as PNG", (), id="eps-named-png"),
        pytest.param(_bmp_named_png, "its content is BMP (rename it to .bmp)", (), id="bmp-as-png"),
        pytest.param(_link_out_of_dataset, "leads outside", (), id="link-out-of-dataset"),
        pytest.param(_link_to_fifo_outside, "leads outside", (), id="link-to-fifo-outside"),
        pytest.param(_link_to_fifo_inside, "not a regular file", (), id="link-to-fifo-inside"),
        pytest.param(_fifo_named_png, "not a regular file", (), id="fifo-named-png"),
        pytest.param(_folder_named_png, "not a regular file", (), id="folder-named-png"),
        pytest.param(_csv_is_a_fifo, "not a regular file", (), id="csv-is-a-fifo"),
        pytest.param(_class_folder_out_of_dataset, "leads outside", (), id="class-folder-link-out"),
        pytest.param(_split_folder_out_of_dataset, "leads outside", (), id="split-folder-link-out"),
    ],
)
def test_hostile_input_is_refused_in_one_line_and_keeps_previous_output(
    small_raw: Path, tmp_path: Path, damage, expected: str, overrides: tuple[str, ...]
) -> None:
    out = tmp_path / "processed"
    process_dataset(small_raw, out, num_workers=1)
    before = tree_digest(out)
    outside = tmp_path / "outside"
    outside.mkdir()
    culprit = damage(small_raw, outside)
    # A stand-in for Ghostscript, first on PATH: Pillow's EPS decoder would run it.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "gs-was-run"
    (fake_bin / "gs").write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    (fake_bin / "gs").chmod(0o755)
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}

    result = process(small_raw, out, tmp_path, *overrides, env=env)

    assert result.returncode == 2, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert culprit in errors[0] and expected in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert not marker.exists()  # no external decoder ran
    assert tree_digest(out) == before  # the earlier output is intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


# --------------------------------------------------------------------------- accepted


def _with_bom(raw: Path, repo: Path) -> None:
    for csv in raw.glob("*.csv"):  # Excel's "CSV UTF-8"
        csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes().replace(b"\n", b"\r\n"))


def _dvc_symlink_cache(repo: Path, *extra: str) -> None:
    """``dvc add`` with the symlink cache type: every file becomes a link into the cache."""
    steps = [("init", "--no-scm"), ("config", "cache.type", "symlink")]
    steps += [extra] if extra else []
    for args in [*steps, ("add", "data/raw")]:
        done = dvc(repo, *args, env={"DVC_NO_ANALYTICS": "1"}, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr


def _dvc_default_cache(raw: Path, repo: Path) -> None:
    _dvc_symlink_cache(repo)
    links = [os.readlink(p) for p in raw.rglob("*") if p.is_symlink()]
    assert len(links) == 18 + 2 and all(".dvc/cache" in link for link in links)


def _dvc_custom_cache(raw: Path, repo: Path) -> None:
    _dvc_symlink_cache(repo, "cache", "dir", str(repo.parent / "shared-cache"))
    links = [os.readlink(p) for p in raw.rglob("*") if p.is_symlink()]
    assert len(links) == 18 + 2 and all("shared-cache" in link for link in links)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_with_bom, id="csv-with-byte-order-mark"),
        pytest.param(_dvc_default_cache, id="links-into-dvc-cache"),
        pytest.param(_dvc_custom_cache, id="links-into-custom-dvc-cache"),
    ],
)
def test_what_dvc_and_excel_write_is_accepted(small_raw: Path, tmp_path: Path, change) -> None:
    expected = tmp_path / "expected"
    process_dataset(small_raw, expected, num_workers=1)
    repo = tmp_path / "repo"
    raw = repo / "data" / "raw"
    raw.parent.mkdir(parents=True)
    shutil.copytree(small_raw, raw)
    change(raw, repo)

    result = process(Path("data/raw"), Path("data/processed"), repo)

    assert result.returncode == 0, result.stderr
    assert tree_digest(repo / "data" / "processed") == tree_digest(expected)


# --------------------------------------------------------------------------- other formats


def _folder_layout_with_other_formats(raw: Path) -> list[Path]:
    """The small dataset listed by its folders (no CSVs), with files of other formats."""
    for csv in raw.glob("*.csv"):
        csv.unlink()
    others = [raw / "train" / "ant" / "x.gif", raw / "test" / "bee" / "y.HEIC"]
    others.append(raw / "test" / "bee" / "z.tif")
    for path in others:
        Image.fromarray(np.zeros((6, 6), dtype=np.uint8)).save(path, format="GIF")
    (raw / "train" / "ant" / ".DS_Store").write_bytes(b"\0")  # hidden: never counted
    return others


def test_other_formats_in_class_folders_are_skipped_and_counted_once(
    small_raw: Path, tmp_path: Path
) -> None:
    others = _folder_layout_with_other_formats(small_raw)

    result = process(small_raw, tmp_path / "processed", tmp_path)

    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "unsupported formats" in line]
    assert len(said) == 1, result.stderr
    assert "skipped 3 file(s) of unsupported formats (.gif: 1, .heic: 1, .tif: 1)" in said[0]
    assert f"under {small_raw / 'test' / 'bee'}, {small_raw / 'train' / 'ant'}" in said[0]
    assert "unsupported_files=error" in said[0]
    assert len(np.load(tmp_path / "processed" / "test_labels.npy")) == 6  # the images alone
    assert all(p.exists() for p in others)


def test_other_formats_with_unsupported_files_error_stop_before_any_work(
    small_raw: Path, tmp_path: Path
) -> None:
    _folder_layout_with_other_formats(small_raw)

    result = process(small_raw, tmp_path / "processed", tmp_path, "unsupported_files=error")

    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "3 file(s) of unsupported formats (.gif: 1, .heic: 1, .tif: 1)" in line
    assert str(small_raw / "test" / "bee" / "y.HEIC") in line and "unsupported_files=skip" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "processed").exists()


def test_unsupported_files_takes_skip_or_error_only(small_raw: Path, tmp_path: Path) -> None:
    result = process(small_raw, tmp_path / "processed", tmp_path, "unsupported_files=ignore")
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "unsupported_files" in line and "skip or error" in line
