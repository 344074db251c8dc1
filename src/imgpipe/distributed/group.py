"""This process's place in a training on several processes: who it is (``Group``, from
torchrun's environment), joining and leaving the group (gloo on the CPU, nccl on CUDA),
DDP around the model, and a peer's death turned into ``PeerLost``."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from imgpipe.errors import PipelineError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torchrun sets it in restarted workers (--max-restarts): they continue the checkpoint.
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"


class PeerLost(PipelineError):
    """Another process of the group ended: this one stops too (its error is the other's)."""


@dataclass(frozen=True)
class Group:
    """This process's place in the training: rank, world size, and the same on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that talks to the world."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Group:
        """The group torchrun describes in the environment; one process when it is unset."""
        env = os.environ if env is None else env
        values = {}
        for key, name, default in (
            ("rank", "RANK", 0),
            ("world", "WORLD_SIZE", 1),
            ("local_rank", "LOCAL_RANK", 0),
            ("local_world", "LOCAL_WORLD_SIZE", None),
        ):
            raw = env.get(name)
            try:
                values[key] = default if raw in (None, "") else int(raw)
            except ValueError:
                raise PipelineError(
                    f"environment variable {name}={raw!r} is not an integer"
                ) from None
        if values["local_world"] is None:
            values["local_world"] = values["world"]
        group = cls(**values)
        if not (0 <= group.rank < group.world and 0 <= group.local_rank < group.local_world):
            raise PipelineError(
                f"RANK={group.rank} WORLD_SIZE={group.world} LOCAL_RANK={group.local_rank} "
                f"LOCAL_WORLD_SIZE={group.local_world}: ranks must lie below their world size"
            )
        return group


def check_world(configured: int, group: Group) -> None:
    """Say so when the config asks for another number of processes than torchrun started
    (``python src/train_model.py`` by hand runs one, whatever nproc_per_node says)."""
    if configured != group.world and group.main:
        log.warning(
            "nproc_per_node x nnodes = %d, but %d process(es) run: start through `make train` "
            "(or torchrun) to train on several",
            configured,
            group.world,
        )


def restarted() -> bool:
    """True in a worker that torchrun restarted after a failure of the group."""
    return int(os.environ.get(RESTART_ENV) or 0) > 0


def quiet_other_ranks(group: Group) -> None:
    """Ranks other than 0 log only errors, to the console only (rank 0 keeps the files)."""
    if group.main:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.ERROR)


# --------------------------------------------------------------------------- the group


def start(group: Group, device: torch.device) -> torch.device:
    """Join the group (world > 1): nccl on CUDA, each rank on GPU ``LOCAL_RANK`` of its
    node; gloo on the CPU. Returns the device this rank trains on."""
    if not group.active:
        return device
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        if group.local_rank >= torch.cuda.device_count():
            raise PipelineError(
                f"rank {group.rank} wants GPU {group.local_rank} but this node shows "
                f"{torch.cuda.device_count()}: --nproc-per-node must not exceed the GPUs"
            )
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise PipelineError(f"several processes need the CPU or CUDA, not {device.type}")
    with peers_guarded(group):
        dist.init_process_group(
            backend,
            store=_store_of_this_attempt(group),
            rank=group.rank,
            world_size=group.world,
            device_id=device if backend == "nccl" else None,
        )
    log.info(
        "process group: %d processes (%d on this node) on %s, rank %d",
        group.world,
        group.local_world,
        backend,
        group.rank,
    )
    return device


@contextlib.contextmanager
def session(group: Group) -> Iterator[None]:
    """The group's life in this process: a peer's death is ``PeerLost``; the group is
    left at the end (``start`` joins it once the device is known)."""
    try:
        with peers_guarded(group):
            yield
    finally:
        end(group)


def _store_of_this_attempt(group: Group) -> Any:
    """torchrun's store, under a prefix of its own for each restart of the group: the
    agent keeps one store across restarts, and a restarted group that reads the dead
    processes' addresses from it hangs or is refused (gloo, torch 2.13)."""
    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=group.world,
        # torchrun's agent serves it; started some other way (srun setting RANK and
        # MASTER_ADDR), rank 0 does.
        is_master=group.main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"imgpipe/attempt{os.environ.get(RESTART_ENV) or 0}", store)


def end(group: Group) -> None:
    if group.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer",
                                  "gloo", "NCCL", "ProcessGroup")
    )  # fmt: skip


@contextlib.contextmanager
def peers_guarded(group: Group) -> Iterator[None]:
    """A collective that fails because another rank died raises ``PeerLost``."""
    try:
        yield
    except RuntimeError as exc:
        if group.active and _is_peer_failure(exc):
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PeerLost(
                f"rank {group.rank}: another process of the group ended ({first[:200]})"
            ) from exc
        raise


def seed_rank(seed: int, group: Group) -> None:
    """Each rank's own dropout masks: rank 0 keeps ``seed``'s stream, rank r draws from
    another one. The order of the batches comes from a generator every rank seeds alike."""
    if group.rank:
        import torch

        torch.manual_seed(seed + 1_000_003 * group.rank)


def wrap(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """DDP around the model when there are several processes (it broadcasts rank 0's
    weights once and averages the gradients in every backward pass)."""
    if not group.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # The 1-channel first convolution's weight gradient comes out with other (equivalent)
    # strides than its parameter: DDP copies it into its bucket and warns at every step.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=ids)
