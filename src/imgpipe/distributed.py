"""One training on several processes, GPUs or machines: torchrun starts the processes,
this module is what each of them needs to take part.

    make train NPROC=2                      # torchrun --standalone --nproc-per-node=2
    python -m imgpipe.distributed --standalone --nproc-per-node=2 src/train_model.py

PyTorch's launcher (``torch.distributed.run``, c10d rendezvous, ``--max-restarts``) is the
engine; nothing here coordinates processes. Each process reads its place from torchrun's
environment (``Group.from_env``: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), joins
the group on gloo (CPU) or nccl (CUDA, device ``cuda:LOCAL_RANK``), and the training
story in ``imgpipe.train`` asks the group a few things:

- ``train_bs`` stays the *global* batch: every rank draws the same shuffled order and
  takes its contiguous share of each batch (``engine``). Its local loss is the sum over
  its share divided by the global batch size, times the world size, so DDP's averaging
  of gradients over the ranks gives the gradient of the global batch mean: the same
  arithmetic as one process, up to the order of floating-point sums (which is why a run
  on 2 processes is reproducible bit for bit on 2 processes, but not equal to 1).
- dropout draws from each rank's own torch RNG (seeded by rank), and every rank's RNG
  state goes into the checkpoint (gathered to rank 0), so a resume continues each rank.
- rank 0 alone writes MLflow, dvclive, console and file logs, checkpoints and the model;
  the others track into ``SilentTracker``.
- a stop (SIGTERM, Ctrl-C) reaches every rank; the ranks agree on it at each batch
  boundary (``agreed``), so they all drop the same batch and none waits on the others.
- a failure on any rank ends the group: a rank whose peer died raises ``PeerLost`` and
  says nothing, the rank that failed says why. Under ``python -m imgpipe.distributed``
  (what make runs) each rank writes its line into a folder the launcher reads, and the
  launcher prints the one line of the rank that failed first, without torchrun's report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from imgpipe.errors import PipelineError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Set by the launcher below: the folder where each rank leaves its one-line message.
MESSAGES_ENV = "IMGPIPE_RANK_MESSAGES"
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


def gather_rngs(state: Any, group: Group) -> None:
    """Every rank's RNG states into ``state`` (a ``checkpoint.TrainingState``) on every
    rank, in rank order, with the world size they belong to."""
    state.world_size = group.world
    if group.active:
        state.rank_rngs = all_gather(group, state.rng)


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


def agreed(should_stop: Callable[[], bool], group: Group) -> Callable[[], bool]:
    """``should_stop`` as all ranks agree on it: true once it is true on any rank. One tiny
    all-reduce per batch, so every rank leaves at the same batch boundary."""
    if not group.active:
        return should_stop
    import torch
    import torch.distributed as dist

    def any_rank() -> bool:
        flag = torch.tensor([1 if should_stop() else 0], dtype=torch.int32)
        with peers_guarded(group):
            dist.all_reduce(_on_backend(flag), op=dist.ReduceOp.MAX)
        return bool(flag.item()) if flag.device.type == "cpu" else bool(flag.cpu().item())

    return any_rank


def _on_backend(tensor: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def all_sum(group: Group, *values: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over the ranks (every rank gets the sums)."""
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


def shard_range(n: int, group: Group) -> range:
    """This rank's contiguous share of ``n`` items (evaluation)."""
    start, stop = n * group.rank // group.world, n * (group.rank + 1) // group.world
    return range(start, stop)


class SilentTracker:
    """What ranks other than 0 track into: the Tracker's interface, writing nothing."""

    run_id: str | None = None
    blocking_s = 0.0
    background_cpu_s = 0.0

    def __enter__(self) -> SilentTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def wait(self) -> str | None:
        return None

    def replay(self, history: Sequence[Mapping[str, Any]]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_confusion_matrix(self, actual: Sequence[str], predicted: Sequence[str]) -> None:
        pass

    def log_model(self, model: Any, example: Any) -> None:
        pass


# --------------------------------------------------------------------------- one-line errors


def speaks(kind: str, line: str) -> bool:
    """Called by ``imgpipe.cli`` before it prints a rank's last line (``kind``: error,
    stopped, peer). Under the launcher the line goes to its folder, and the launcher prints
    the one that matters; under a bare torchrun only rank 0 prints, and a rank that failed
    by itself. Returns whether this process prints the line."""
    group = _group_or_none()
    if group is None or not group.active:
        return kind != "peer" or group is None
    folder = os.environ.get(MESSAGES_ENV)
    if folder:
        record = {"rank": group.rank, "kind": kind, "line": line, "time": time.time()}
        with contextlib.suppress(OSError):
            path = Path(folder) / f"rank{group.rank}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        return False
    return kind == "error" or (kind == "stopped" and group.main)


def _group_or_none() -> Group | None:
    try:
        return Group.from_env()
    except PipelineError:
        return None


def first_message(folder: Path) -> str | None:
    """The line to print for a group that ended badly: the earliest error of a rank that
    failed by itself, else rank 0's stop line (ranks that only saw a peer die say nothing)."""
    records = []
    for path in folder.glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    errors = sorted((r["time"], r["rank"], r["line"]) for r in records if r["kind"] == "error")
    if errors:
        return errors[0][2]
    stops = sorted((r["rank"], r["line"]) for r in records if r["kind"] == "stopped")
    return stops[0][1] if stops else None


def launch(argv: Sequence[str]) -> int:
    """torchrun (``torch.distributed.run``) with the same arguments; the group's outcome as
    one line and an exit status, instead of torchrun's multi-page failure report."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(argv))
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 and print a banner about it; we share the cores out the same way.
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cores() // max(1, _local_procs(args))))
    # Its own lines (rendezvous details, "failed (exitcode: 2) local_rank: 1 ...") stay
    # quiet: the outcome is the one line below. Its loggers have levels of their own.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="imgpipe-ranks-") as folder:
        os.environ[MESSAGES_ENV] = folder
        try:
            run(args)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
            how = failure.signal_name() if failure.exitcode < 0 else f"exit {failure.exitcode}"
            line = first_message(Path(folder)) or (
                f"error: training process of rank {rank} (pid {failure.pid} on "
                f"{socket.gethostname()}) ended by {how}"
            )
            print(line, file=sys.stderr, flush=True)
            return code
        except SignalException as exc:
            line = first_message(Path(folder))
            print(line or f"stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
            return 128 + int(exc.sigval)
    return 0


def _cores() -> int:
    from imgpipe.cpus import available_cpus

    return available_cpus()


def _local_procs(args: Any) -> int:
    try:
        return int(args.nproc_per_node)
    except (TypeError, ValueError):  # "gpu", "cpu", "auto": torchrun decides
        return 1


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
