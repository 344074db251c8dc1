"""What the pipeline is measured against: the naive ways and the hardware limits.

- ``naive_process``: the upstream's processing, one process, per image: PIL open,
  a torch transform, one saved file per image.
- ``decode_limit``: a tight loop decoding the same files on all cores, no other work, with
  the fastest decoder that gives Pillow's pixels (bench/decode.py measures them): pyspng
  for PNG, simplejpeg for JPEG; Pillow's own decoder opened directly without them.
- ``bare_training``: a plain PyTorch loop over the same in-memory tensors and model.
- ``per_item_training``: the upstream's per-item PNG Dataset + DataLoader.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, JpegImagePlugin, PngImagePlugin

from bench.measure import pool_rate


def naive_process(files: list[Path], labels: list[int], out_dir: Path) -> float:
    """Images per second of the per-image baseline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, (path, label) in enumerate(zip(files, labels, strict=True)):
        with Image.open(path) as im:
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float().div(255)
        x = (x - 0.1307) / 0.3081
        torch.save({"image": x.unsqueeze(0), "label": label}, out_dir / f"{i}.pt")
    return len(files) / (time.perf_counter() - start)


def pillow_decode(name: str) -> bytes:
    # Pillow's decoder opened directly, pixels as bytes (Image.open's format probing and
    # np.asarray add about a fifth per 28x28 image).
    plugin = PngImagePlugin.PngImageFile if name.endswith(".png") else JpegImagePlugin.JpegImageFile
    with plugin(name) as im:
        return im.tobytes()


def read_file(name: str) -> bytes:
    # Plain os calls: a file object costs a few microseconds more per small file.
    fd = os.open(name, os.O_RDONLY)
    try:
        return os.read(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def fastest_decode(name: str) -> object:
    """The file's bytes read and decoded by the fastest decoder, nothing else."""
    try:
        if name.endswith(".png"):
            import pyspng

            return pyspng.load(read_file(name))
        import simplejpeg

        return simplejpeg.decode_jpeg(read_file(name))
    except ImportError:
        return pillow_decode(name)


def _decode(names: list[str]) -> int:
    for name in names:
        fastest_decode(name)
    return len(names)


def decode_limit(files: list[Path], workers: int) -> float:
    """Images per second when every core does nothing but decode."""
    return pool_rate(_decode, [str(p) for p in files], workers)


def bare_training(
    images: np.ndarray,
    labels: np.ndarray,
    model: torch.nn.Module,
    batch_size: int,
    epochs: int,
    lr: float = 1.0,
    device: torch.device | None = None,
) -> float:
    """Samples per second of a plain loop: float tensors in memory (on the GPU when
    ``device`` is one), no tracking, no eval."""
    device = device or torch.device("cpu")
    x_all = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255)
    x_all = ((x_all - x_all.mean()) / x_all.std()).to(device)
    y_all = torch.from_numpy(np.array(labels, dtype=np.int64)).to(device)
    model.to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=generator)
        for i in range(0, len(order), batch_size):
            index = order[i : i + batch_size]
            optimizer.zero_grad()
            loss = F.nll_loss(model(x_all[index]), y_all[index])
            loss.backward()
            optimizer.step()
    _sync(device)
    return len(y_all) * epochs / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PngDataset(torch.utils.data.Dataset):
    """The upstream way: decode and transform one PNG per item, every epoch."""

    def __init__(self, files: list[Path], labels: list[int]) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as im:
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float().div(255)
        return ((x - 0.1307) / 0.3081).unsqueeze(0), self.labels[i]


def per_item_training(
    files: list[Path],
    labels: list[int],
    model: torch.nn.Module,
    batch_size: int,
    epochs: int,
    workers: int = 0,
    device: torch.device | None = None,
) -> float:
    """The upstream loop: a per-item Dataset + DataLoader (pinned, non-blocking on a GPU)."""
    device = device or torch.device("cpu")
    loader = torch.utils.data.DataLoader(
        PngDataset(files, labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
        pin_memory=device.type == "cuda",
    )
    model.to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            F.nll_loss(model(x), y).backward()
            optimizer.step()
    _sync(device)
    return len(files) * epochs / (time.perf_counter() - start)
