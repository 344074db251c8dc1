"""Pure torch, no tracking inside: the device, the seeds, the data held as tensors, one
epoch of training and one evaluation pass."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgpipe.distributed.collectives import all_gather, all_sum, shard_range
from imgpipe.distributed.group import Group
from imgpipe.errors import PipelineError

log = logging.getLogger(__name__)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(device: str, no_cuda: bool = False, no_mps: bool = False) -> torch.device:
    """``auto``: CUDA, then MPS, then the CPU; a named device must be there."""
    if device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise PipelineError(
            f"device=cuda but torch {torch.__version__} ({build}) sees no GPU: check the driver "
            "(nvidia-smi) and, in a container, the GPU flags (make ... GPU=nvidia)"
        )
    if device == "mps" and not _mps_available():
        raise PipelineError(f"device=mps but torch {torch.__version__} sees no Apple GPU")
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available() and not no_cuda:
        return torch.device("cuda")
    if not no_mps and _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


# Below this size a split is normalised once and kept as float32: batches are then
# plain index lookups, as in a bare training loop. Above it the split stays uint8
# (a quarter of the memory) and each batch is normalised on the fly.
FLOAT_CACHE_BYTES = 1 << 30


def normalisation(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (scale, shift), shape (1, C, 1, 1), of ``x * scale - shift`` on uint8
    pixels: one definition for every data path, so their batches are bit-identical."""
    shape = (1, len(mean), 1, 1)
    scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(shape)
    shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std)).view(shape)
    return scale, shift


class TensorSplit:
    """One split held in memory as tensors, never decoded per item per epoch."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
    ) -> None:
        # (N, H, W, C) on disk -> (N, C, H, W) for convolutions, once.
        # np.array copies out of the read-only memory map (torch wants writable memory).
        pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        self.device = device
        self.scale, self.shift = normalisation(mean, std)
        self.normalised = pixels.numel() * 4 <= FLOAT_CACHE_BYTES
        self.images = self._normalise(pixels) if self.normalised else pixels
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.images.nbytes <= free // 4:
                # Fits with room to spare: keep the split on the GPU, batches never cross PCIe.
                self.images, self.labels = self.images.to(device), self.labels.to(device)
            else:  # pinned host memory: each batch is one asynchronous copy
                self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        # The same elementwise arithmetic in both paths: results are bit-identical.
        return pixels.float().mul_(self.scale).sub_(self.shift)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].to(self.device, non_blocking=True)
        y = self.labels[index].to(self.device, non_blocking=True)
        return (x if self.normalised else self._normalise(x)), y

    def batches(
        self, indices: Iterable[torch.Tensor | slice]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches for ``indices``, in order (``streaming.StreamingSplit`` reads them ahead)."""
        for index in indices:
            yield self.batch(index)


@dataclass(frozen=True)
class EpochResult:
    loss: float
    accuracy: float


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when asked (matmuls and convolutions in bf16, reductions in float32);
    off, not even a disabled autocast context is entered per batch."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TensorSplit,
    batch_size: int,
    generator: torch.Generator,
    epoch: int,
    log_interval: int,
    bf16: bool = False,
    should_stop: Callable[[], bool] | None = None,
    rank: int = 0,
    world: int = 1,
    on_progress: Callable[[int, int, float], None] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
) -> EpochResult | None:
    """Train one pass over ``data`` in an order drawn from ``generator``. None when
    ``should_stop`` (asked before every batch) says so: the epoch is abandoned.
    ``on_progress(batches done, batches, loss)`` is called every ``log_interval`` batches.

    With ``world`` > 1 processes (``model`` wrapped in DDP) every rank draws the same
    order and trains on its contiguous share of each batch of ``batch_size``; the loss
    is scaled so the averaged gradient is the whole batch's (``imgpipe.distributed``).

    ``augment`` (``imgpipe.augment.Augmenter``) transforms each training batch on the
    device; ``label_smoothing`` mixes that share of the uniform target into the loss."""
    model.train()
    total_loss = torch.zeros((), device=data.device)
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    n = len(data)
    seen = 0
    order = shuffled_batches(n, batch_size, generator)
    if world > 1:
        order = (index.tensor_split(world)[rank] for index in order)
    batches = data.batches(order)
    for step, (x, y) in enumerate(batches, start=1):
        if should_stop is not None and should_stop():
            batches.close()  # a streaming split's reader thread ends here, not at garbage collection
            return None
        optimizer.zero_grad(set_to_none=True)
        if augment is not None:
            x = augment(x)
        with autocast(data.device, bf16):
            output = model(x)
            if world == 1:
                loss = nll_loss(output, y, label_smoothing)
            else:  # DDP divides the summed gradients by world: sum/batch * world undoes it
                whole = min(batch_size, n - (step - 1) * batch_size)
                loss = nll_loss(output, y, label_smoothing, reduction="sum") * (world / whole)
        loss.backward()
        optimizer.step()
        # Accumulate on the device: a .item() per batch would sync every step.
        total_loss += loss.detach() * (len(y) if world == 1 else whole / world)
        correct += (output.detach().argmax(dim=1) == y).sum()
        seen += len(y)
        if step % log_interval == 0:  # the only device sync inside the epoch, for both
            value = loss.item()
            log.debug("train epoch %d [%d/%d] loss %.6f", epoch, seen, n, value)
            if on_progress is not None:
                on_progress(step, (n + batch_size - 1) // batch_size, value)
    if world > 1:
        total_loss, correct = all_sum(Group(rank=rank, world=world), total_loss, correct)
    return EpochResult(loss=total_loss.item() / n, accuracy=correct.item() / n)


def nll_loss(
    output: torch.Tensor, target: torch.Tensor, label_smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    """The loss of log-probabilities ``output`` (every model's output); with smoothing
    ``e``, ``(1 - e) * nll + e * mean(-log p)`` as ``F.cross_entropy`` defines it. Without,
    plain ``F.nll_loss``: the seed's arithmetic, bit for bit."""
    loss = F.nll_loss(output, target, reduction=reduction)
    if not label_smoothing:
        return loss
    uniform = -output.mean(dim=1)
    uniform = uniform.sum() if reduction == "sum" else uniform.mean()
    return (1 - label_smoothing) * loss + label_smoothing * uniform


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TensorSplit,
    batch_size: int,
    bf16: bool = False,
    rank: int = 0,
    world: int = 1,
) -> tuple[EpochResult, torch.Tensor]:
    """Mean loss and accuracy over ``data``, plus the predicted class of every item.
    With ``world`` > 1 each rank scores its contiguous share and every rank gets the
    summed numbers and all predictions, so all agree."""
    model.eval()
    total_loss = torch.zeros((), device=data.device)
    predictions = [torch.zeros(0, dtype=torch.long, device=data.device)]
    n = len(data)
    group = Group(rank=rank, world=world)
    share = shard_range(n, group)
    lo, hi = share.start, share.stop
    shares = (slice(start, min(start + batch_size, hi)) for start in range(lo, hi, batch_size))
    for x, y in data.batches(shares):
        with autocast(data.device, bf16):
            output = model(x)
        total_loss += F.nll_loss(output.float(), y, reduction="sum")
        predictions.append(output.argmax(dim=1))
    predicted = torch.cat(predictions).cpu()
    hits = predicted == data.labels[lo:hi].cpu()
    if world == 1:
        return EpochResult(total_loss.item() / n, hits.float().mean().item()), predicted
    total_loss, correct = all_sum(group, total_loss, hits.sum().to(total_loss.device))
    predicted = torch.cat(all_gather(group, predicted))
    return EpochResult(total_loss.item() / n, correct.item() / n), predicted
