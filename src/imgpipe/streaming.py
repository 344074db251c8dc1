"""Splits too large for memory: batches read from the processed files by a background reader.

``open_splits`` decides, split by split, whether the in-memory ``engine.TensorSplit``
fits the memory budget (``memory_budget_mb``; null: half of the memory available to this
process, cgroup limits included) and otherwise returns a ``StreamingSplit``: the same
interface (``len``, ``batch``, ``batches``, ``labels``, ``device``), so training and
evaluation do not know which they got.

A ``StreamingSplit`` keeps only the labels in memory. ``batches`` hands its index
sequence (drawn from the training generator, never by the reader, so resume and DDP
shards see the same order either way) to a reader thread that stays ``PREFETCH_BATCHES``
ahead in a bounded queue. Each batch's rows are read in sorted order with ``preadv``
(runs of neighbouring rows in one call), then put back in the batch's order, and
normalised with ``TensorSplit``'s own elementwise arithmetic: one seed gives the same
model bit for bit on either path. ``pread`` instead of the memory map: pages read through
a map stay mapped, so a pass over the data would grow the process by the whole file;
read into our own buffers, they are only the kernel's page cache, which it drops as needed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from imgpipe.data.processed import ProcessedData, Split
from imgpipe.engine import FLOAT_CACHE_BYTES, TensorSplit, normalisation
from imgpipe.errors import PipelineError

log = logging.getLogger(__name__)

# Batches the reader keeps ready: enough to ride out a slow read, few enough that the
# queue's memory (PREFETCH_BATCHES float32 batches) stays small beside any budget.
PREFETCH_BATCHES = 4
# Without a limit from the user, the in-memory path may take this share of the memory
# available now: the rest stays for the model, the optimizer, torch and the page cache.
DEFAULT_BUDGET_FRACTION = 0.5
# How often a blocked reader or consumer looks whether the other side has gone away.
POLL_S = 0.1

Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- the budget


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still take (v2, else v1), the tightest of its own
    limit and its parents'; None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            root, limit_file, usage_file = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory")
            limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        own = root / path.lstrip("/")
        # In a container the own folder is often mounted as the root itself.
        folders = (
            [own, *own.parents[: len(own.parents) - len(root.parents)]] if own.is_dir() else [root]
        )
        for folder in folders:
            try:
                limit = folder.joinpath(limit_file).read_text().strip()
                usage = int(folder.joinpath(usage_file).read_text())
            except (OSError, ValueError):
                continue
            if limit != "max" and int(limit) < 1 << 60:  # v1 says "none" with a huge number
                rooms.append(max(0, int(limit) - usage))
    return min(rooms) if rooms else None


def available_memory() -> int | None:
    """Bytes this process can still take: the machine's available memory, or less where a
    cgroup (a container, a systemd slice, a batch job) limits it; None when unknown."""
    machine = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                machine = int(line.split()[1]) * 1024
                break
    except OSError:
        try:
            import psutil

            machine = int(psutil.virtual_memory().available)
        except ImportError:
            machine = None
    room = _cgroup_room()
    known = [m for m in (machine, room) if m is not None]
    return min(known) if known else None


def memory_budget(budget_mb: int | None) -> int | None:
    """The budget in bytes: ``budget_mb`` when set, else a share of the available memory
    (None: unknown, everything stays in memory as before)."""
    if budget_mb is not None:
        return budget_mb * 1024 * 1024
    available = available_memory()
    return None if available is None else int(available * DEFAULT_BUDGET_FRACTION)


def in_memory_bytes(images: np.ndarray) -> int:
    """Peak bytes of holding ``images`` as a ``TensorSplit``: the copy out of the map and its
    channels-first copy; a float32 cache (4 bytes a pixel) where the split is small enough."""
    raw = int(images.size) * images.itemsize
    return raw + 4 * raw if 4 * raw <= FLOAT_CACHE_BYTES else 2 * raw


# --------------------------------------------------------------------------- choosing the path


def open_splits(
    data: ProcessedData,
    names: Iterable[str],
    device: torch.device,
    budget_mb: int | None,
) -> dict[str, TensorSplit | StreamingSplit]:
    """Each named split in memory while the budget lasts (in the order given), streamed from
    its file past that; one log line says which went where."""
    budget = memory_budget(budget_mb)
    left = budget
    splits: dict[str, TensorSplit | StreamingSplit] = {}
    where = []
    for name in names:
        split: Split = getattr(data, name)
        need = in_memory_bytes(split.images)
        if left is None or need <= left:
            splits[name] = TensorSplit(split.images, split.labels, data.mean, data.std, device)
            left = None if left is None else left - need
            where.append(f"{name} in memory ({_mb(need)})")
        else:
            splits[name] = StreamingSplit(split.images, split.labels, data.mean, data.std, device)
            where.append(f"{name} streamed from its file ({_mb(need)} in memory would not fit)")
    limit = "no limit known" if budget is None else f"budget {_mb(budget)}"
    log.info("data: %s; %s (memory_budget_mb)", ", ".join(where), limit)
    return splits


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 1024:.0f} kB"


# --------------------------------------------------------------------------- the streaming split


class StreamingSplit:
    """One split read from its ``.npy`` file batch by batch; only the labels in memory."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
    ) -> None:
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        self.device = device
        self._images = images  # the memory map: shape and fallback reads only
        self._row_shape = tuple(images.shape[1:])
        self._row_bytes = int(np.prod(self._row_shape)) * images.itemsize
        path = getattr(images, "filename", None)
        self._path = str(path) if path else None
        self._offset = int(getattr(images, "offset", 0))
        # preadv reads straight into the batch's buffer; without it (or without a file:
        # an array in memory) rows are copied out of the array itself.
        self._fd = os.open(self._path, os.O_RDONLY) if self._path and _HAS_PREADV else None
        # Exactly TensorSplit's constants and arithmetic (see _normalise).
        self.scale, self.shift = normalisation(mean, std)
        self.pin = device.type == "cuda"
        self.on_cpu = device.type == "cpu"
        self._scale_hwc = self.scale.reshape(-1).numpy().copy()  # per channel, last axis
        self._shift_hwc = self.shift.reshape(-1).numpy().copy()
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    # ---- reading

    def _rows(self, index: torch.Tensor | slice) -> np.ndarray:
        """The batch's rows (N, H, W, C) as uint8, in the order ``index`` names them."""
        if isinstance(index, slice):
            start, stop, _ = index.indices(len(self))
            return self._read_sorted(np.arange(start, max(start, stop)))
        wanted = np.asarray(index, dtype=np.int64)
        order = np.argsort(wanted, kind="stable")
        rows = self._read_sorted(wanted[order])
        out = np.empty_like(rows)
        out[order] = rows  # back in the generator's order
        return out

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self._row_shape), dtype=np.uint8)
        if self._fd is None:
            out[...] = self._images[rows]
            return out
        flat = out.reshape(len(rows), self._row_bytes)
        # Runs of consecutive rows: one read each (an evaluation slice is one run).
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for start, stop in zip(
            np.concatenate(([0], breaks)), np.concatenate((breaks, [len(rows)])), strict=True
        ):
            offset = self._offset + int(rows[start]) * self._row_bytes
            want = (stop - start) * self._row_bytes
            try:
                got = os.preadv(self._fd, [flat[start:stop]], offset)
            except OSError as exc:
                raise PipelineError(f"{self._path}: reading images failed: {exc}") from exc
            if got != want:
                raise PipelineError(
                    f"{self._path}: file ended early ({got} of {want} bytes at offset {offset}); "
                    "re-run process_data"
                )
        return out

    def _prepare(self, index: torch.Tensor | slice) -> Batch:
        """Read and reorder one batch to channels first (on the reader thread); on the CPU
        normalise it there too, off the training thread."""
        rows = self._rows(index)
        y = self.labels[index]
        if self.on_cpu:
            return self._normalise_rows(rows), y
        pixels = torch.from_numpy(rows).permute(0, 3, 1, 2).contiguous()
        if self.pin:
            pixels, y = pixels.pin_memory(), y.pin_memory()
        return pixels, y

    def _normalise_rows(self, rows: np.ndarray) -> torch.Tensor:
        """TensorSplit's arithmetic (float32, times scale, minus shift: each step exactly
        rounded, so bit-identical) in numpy, which runs on this thread alone: torch would
        start a second OpenMP team here, whose spinning threads slow the training's."""
        x = rows.astype(np.float32)
        np.multiply(x, self._scale_hwc, out=x)
        np.subtract(x, self._shift_hwc, out=x)
        out = torch.from_numpy(x).permute(0, 3, 1, 2)  # a view where C is 1, as TensorSplit's
        if not out.is_contiguous():
            # TensorSplit's .contiguous() layout, copied by numpy (one thread).
            out = torch.empty(out.shape, dtype=torch.float32)
            out.numpy()[...] = x.transpose(0, 3, 1, 2)
        return out

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        # The same elementwise arithmetic as TensorSplit._normalise: bit-identical inputs.
        return pixels.float().mul_(self.scale).sub_(self.shift)

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        if self.on_cpu:
            return x, y
        # A GPU normalises its uint8 copy: a quarter of the bytes cross the bus.
        x = self._normalise(x.to(self.device, non_blocking=True))
        return x, y.to(self.device, non_blocking=True)

    # ---- the interface

    def batch(self, index: torch.Tensor | slice) -> Batch:
        """One batch, read now (no reader thread)."""
        return self._finish(*self._prepare(index))

    def batches(self, indices: Iterable[torch.Tensor | slice]) -> Iterator[Batch]:
        """The batches for ``indices`` in order, read ahead by a background thread. Leaving
        the loop early (a stop, an error) ends the thread within ``POLL_S``."""
        plan = list(indices)  # drawn here, on the caller's thread, from its generator
        ready: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        done = threading.Event()
        reader = threading.Thread(
            target=self._read_ahead, args=(plan, ready, done), name="imgpipe-reader", daemon=True
        )
        reader.start()
        try:
            for _ in plan:
                item = self._take(ready, reader)
                if isinstance(item, BaseException):
                    raise item
                yield self._finish(*item)
        finally:
            done.set()
            reader.join()

    def _read_ahead(self, plan: list, ready: queue.Queue, done: threading.Event) -> None:
        for index in plan:
            try:
                item: Batch | BaseException = self._prepare(index)
            except Exception as exc:  # handed to the consumer, which raises it
                item = exc
            while not done.is_set():
                try:
                    ready.put(item, timeout=POLL_S)
                    break
                except queue.Full:
                    continue
            if done.is_set() or isinstance(item, BaseException):
                return

    @staticmethod
    def _take(ready: queue.Queue, reader: threading.Thread) -> Batch | BaseException:
        # A timed wait: signal handlers (the stop flag) run, and a dead reader is noticed.
        while True:
            try:
                return ready.get(timeout=POLL_S)
            except queue.Empty:
                if not reader.is_alive() and ready.empty():
                    return PipelineError("the image reader thread ended early")


_HAS_PREADV = hasattr(os, "preadv")
