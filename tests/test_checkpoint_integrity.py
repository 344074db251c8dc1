"""Checkpoints and model files are checked against their SHA-256 before they are trusted.

The damage is real: one byte flipped inside a tensor's bytes in the saved zip, which
``torch.load`` itself does not notice (it does not check the zip's CRCs).
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import error_lines
from imgpipe import checkpoint, torchfile
from imgpipe.config import TrainConfig
from imgpipe.errors import PipelineError
from imgpipe.testing import run_outputs, run_script, train_config
from imgpipe.train import train


def flip_a_tensor_byte(path: Path) -> str:
    """Flip one byte in the middle of the largest tensor stored in ``path``; its entry name."""
    with zipfile.ZipFile(path) as archive:
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    data = bytearray(path.read_bytes())
    header = info.header_offset
    # Local file header: 30 fixed bytes, then the name and the extra field (their lengths
    # at offsets 26 and 28); torch stores tensors uncompressed, so the bytes follow.
    start = header + 30 + int.from_bytes(data[header + 26 : header + 28], "little")
    start += int.from_bytes(data[header + 28 : header + 30], "little")
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return info.filename


@pytest.fixture
def cfg(tmp_path: Path, sample_processed: Path, monkeypatch: pytest.MonkeyPatch) -> TrainConfig:
    monkeypatch.chdir(tmp_path)
    return train_config(sample_processed, tmp_path / "run", epochs=2, setup_mlflow=False)


def test_torch_itself_loads_a_flipped_tensor_byte_without_a_word(tmp_path: Path) -> None:
    """Why the digest exists: the damage is invisible to torch.load."""
    path = torchfile.save(
        {"format": 3, "w": torch.arange(1000, dtype=torch.float32)}, tmp_path / "f.pt"
    )
    flip_a_tensor_byte(path)
    raw = torch.load(path, weights_only=True)
    assert not torch.equal(raw["w"], torch.arange(1000, dtype=torch.float32))
    with pytest.raises(torchfile.DamagedFile, match=r"f\.pt: the torch file is damaged"):
        torchfile.load(path)


def test_a_flipped_byte_in_the_newest_checkpoint_resumes_from_the_previous_loudly(
    cfg: TrainConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train(cfg)
    models = Path(cfg.model_checkpoint_dir_path)
    newest = models / checkpoint.CHECKPOINT_FILE
    flip_a_tensor_byte(newest)

    with caplog.at_level(logging.WARNING, logger="imgpipe"):
        train(replace(cfg, epochs=3, resume=True))

    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert str(newest) in warnings[0] and "checkpoint.prev.pt (epoch 1)" in warnings[0]
    # Resumed from epoch 1, so epochs 2 and 3 were trained again: the same weights as a
    # straight 3-epoch run, never the damaged ones.
    straight = replace(cfg, epochs=3, **run_outputs(tmp_path / "straight"))
    train(straight)
    resumed = checkpoint.load(models / checkpoint.MODEL_FILE)["state_dict"]
    expected = checkpoint.load(Path(straight.model_checkpoint_dir_path) / "model.pt")["state_dict"]
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert checkpoint.load(newest)["epoch"] == 3


def test_both_checkpoints_damaged_stop_with_one_line(cfg: TrainConfig, tmp_path: Path) -> None:
    train(cfg)
    models = Path(cfg.model_checkpoint_dir_path)
    for name in (checkpoint.CHECKPOINT_FILE, checkpoint.PREVIOUS_FILE):
        flip_a_tensor_byte(models / name)
    before = {p.name: p.read_bytes() for p in models.iterdir()}

    result = run_script(
        "train_model.py",
        f"data_dir_path={cfg.data_dir_path}",
        *(f"{k}={v}" for k, v in run_outputs(tmp_path / "run").items()),
        "setup_mlflow=false",
        "epochs=3",
        "resume=true",
        cwd=tmp_path,
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: no readable checkpoint in {models}")
    assert "checkpoint.pt: the checkpoint file is damaged" in line
    assert "checkpoint.prev.pt: the checkpoint file is damaged" in line
    assert "resume=false" in line
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before  # nothing touched


def test_a_damaged_model_file_is_refused(cfg: TrainConfig) -> None:
    train(replace(cfg, epochs=1))
    model_file = Path(cfg.model_checkpoint_dir_path) / checkpoint.MODEL_FILE
    assert set(torchfile.load_model_file(model_file)["state_dict"])  # intact: loads
    flip_a_tensor_byte(model_file)
    with pytest.raises(torchfile.DamagedFile, match=r"model\.pt: the model file is damaged"):
        torchfile.load_model_file(model_file)


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param(b"", "damaged or not a torch file", id="empty"),
        pytest.param(b"PK\x03\x04 not really a zip", "damaged or not a torch file", id="garbage"),
    ],
)
def test_an_unreadable_model_file_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=message) as caught:
        torchfile.load_model_file(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_model_file_with_code_inside_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "hook": logging.getLogger}, path)  # a global: code on load
    with pytest.raises(torchfile.DamagedFile, match="weights-only loading refuses"):
        torchfile.load_model_file(path)


def test_a_file_from_before_digests_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "classes": ["a"]}, path)
    with caplog.at_level(logging.WARNING, logger="imgpipe"):
        loaded = torchfile.load_model_file(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert "loaded unverified" in caplog.text


def test_a_sealed_format_without_its_digest_is_damaged(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": checkpoint.FORMAT, "epoch": 1}, path)
    with pytest.raises(torchfile.DamagedFile, match="lost its content digest"):
        checkpoint.load(path)
