"""What the ranks of a group exchange, and each rank's share of the work: the one place
that calls ``torch.distributed``'s collectives (the engine, the training story and the
checkpoint all go through here). With one process each is the identity, at no cost.
A collective that fails because another rank died raises ``PeerLost``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from imgpipe.distributed.group import Group, peers_guarded

if TYPE_CHECKING:
    import torch


def shard_range(n: int, group: Group) -> range:
    """This rank's contiguous share of ``n`` items (evaluation)."""
    start, stop = n * group.rank // group.world, n * (group.rank + 1) // group.world
    return range(start, stop)


def all_sum(group: Group, *values: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over the ranks (every rank gets the sums, on the value's device)."""
    if not group.active:
        return list(values)
    import torch.distributed as dist

    out = []
    with peers_guarded(group):
        for value in values:
            reduced = _on_backend(value.clone())
            dist.all_reduce(reduced)
            out.append(reduced.to(value.device))
    return out


def all_gather(group: Group, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not group.active:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * group.world
    with peers_guarded(group):
        dist.all_gather_object(gathered, value)
    return gathered


def from_main(group: Group, value: Any) -> Any:
    """Rank 0's ``value`` (picklable), on every rank."""
    if not group.active:
        return value
    import torch.distributed as dist

    box = [value if group.main else None]
    with peers_guarded(group):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(should_stop: Callable[[], bool], group: Group) -> Callable[[], bool]:
    """``should_stop`` as all ranks agree on it: true once it is true on any rank. One tiny
    all-reduce per batch, so every rank leaves at the same batch boundary."""
    if not group.active:
        return should_stop
    import torch
    import torch.distributed as dist

    def any_rank() -> bool:
        # On nccl the flag is copied to the GPU: read the copy that was reduced.
        flag = _on_backend(torch.tensor([1 if should_stop() else 0], dtype=torch.int32))
        with peers_guarded(group):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.cpu().item())

    return any_rank


def gather_rngs(state: Any, group: Group) -> None:
    """Every rank's RNG states into ``state`` (a ``checkpoint.TrainingState``) on every
    rank, in rank order, with the world size they belong to."""
    state.world_size = group.world
    if group.active:
        state.rank_rngs = all_gather(group, state.rng)


def _on_backend(tensor: torch.Tensor) -> torch.Tensor:
    """nccl reduces only on the GPU; gloo wherever the tensor is."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor
