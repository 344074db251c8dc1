"""The launcher: ``python -m imgpipe.distributed <torchrun's arguments> SCRIPT`` (what
``make train NPROC=2`` runs) is torchrun (``torch.distributed.run``) with the group's
outcome as one line and an exit status, instead of torchrun's multi-page failure report.

Each rank leaves its last line (``speaks``, called by ``imgpipe.cli``) in a folder the
launcher names in ``IMGPIPE_RANK_MESSAGES``; the launcher prints the line of the rank that
failed first (``first_message``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgpipe.distributed.group import Group
from imgpipe.errors import PipelineError

# Set by the launcher below: the folder where each rank leaves its one-line message.
MESSAGES_ENV = "IMGPIPE_RANK_MESSAGES"


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
