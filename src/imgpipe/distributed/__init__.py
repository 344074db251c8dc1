"""One training on several processes, GPUs or machines: torchrun starts the processes,
this package is what each of them needs to take part.

    make train NPROC=2                      # torchrun --standalone --nproc-per-node=2
    python -m imgpipe.distributed --standalone --nproc-per-node=2 src/train_model.py

PyTorch's launcher (``torch.distributed.run``, c10d rendezvous, ``--max-restarts``) is the
engine; nothing here coordinates processes. The rooms:

- ``group``: this process's place (``Group.from_env``: RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE from torchrun's environment), joining and leaving the group on gloo
  (CPU) or nccl (CUDA, device ``cuda:LOCAL_RANK``), DDP around the model, a peer's death
  as ``PeerLost``;
- ``collectives``: the few things ranks exchange (sums, gathers, rank 0's value, the stop
  flag they agree on, every rank's RNG state for the checkpoint), and each rank's share;
- ``launch``: ``python -m imgpipe.distributed`` (what make runs), torchrun with the
  group's outcome as one line, and the rank's side of that (``speaks``).

What the training story (``imgpipe.train``, ``imgpipe.engine``) relies on:

- ``train_bs`` stays the *global* batch: every rank draws the same shuffled order and
  takes its contiguous share of each batch (``engine``). Its local loss is the sum over
  its share divided by the global batch size, times the world size, so DDP's averaging
  of gradients over the ranks gives the gradient of the global batch mean: the same
  arithmetic as one process, up to the order of floating-point sums (which is why a run
  on 2 processes is reproducible bit for bit on 2 processes, but not equal to 1).
- dropout draws from each rank's own torch RNG (seeded by rank), and every rank's RNG
  state goes into the checkpoint (gathered to rank 0), so a resume continues each rank.
- rank 0 alone writes MLflow, dvclive, console and file logs, checkpoints and the model;
  the others track into ``imgpipe.tracking.SilentTracker``.
- a stop (SIGTERM, Ctrl-C) reaches every rank; the ranks agree on it at each batch
  boundary (``agreed``), so they all drop the same batch and none waits on the others.
- a failure on any rank ends the group: a rank whose peer died raises ``PeerLost`` and
  says nothing, the rank that failed says why; the launcher prints the one line of the
  rank that failed first, without torchrun's report.
"""

from __future__ import annotations

from imgpipe.distributed.collectives import (
    agreed,
    all_gather,
    all_sum,
    from_main,
    gather_rngs,
    shard_range,
)
from imgpipe.distributed.group import (
    RESTART_ENV,
    Group,
    PeerLost,
    check_world,
    end,
    peers_guarded,
    quiet_other_ranks,
    restarted,
    seed_rank,
    session,
    start,
    wrap,
)
from imgpipe.distributed.launch import MESSAGES_ENV, first_message, launch, speaks

__all__ = [
    "MESSAGES_ENV",
    "RESTART_ENV",
    "Group",
    "PeerLost",
    "agreed",
    "all_gather",
    "all_sum",
    "check_world",
    "end",
    "first_message",
    "from_main",
    "gather_rngs",
    "launch",
    "peers_guarded",
    "quiet_other_ranks",
    "restarted",
    "seed_rank",
    "session",
    "shard_range",
    "speaks",
    "start",
    "wrap",
]
