"""One stop flag: SIGTERM or SIGINT asks a run to stop cleanly, a second signal ends it now.

Schedulers (Kubernetes, SLURM, spot instances, ``docker stop``) send SIGTERM and kill
a few seconds later. The entry points call ``install()``: the first signal only sets
the flag; training looks at it between batches (``requested``) and raises ``Stopped``
there, so the epoch in flight is dropped and the checkpoint of the last completed
epoch stands; the MLflow run ends KILLED and the process exits 128 + the signal
(143, 130). A second signal exits at once, without cleanup.

The signal must reach the process however it was started. ``make`` passes SIGTERM to
its recipe's shell only, which dies of it; DVC passes nothing on and dies alone. So
``install()`` also watches the launchers above this process, up to the nearest
``dvc`` (else the nearest ``make``): when one of them ends, this process stops as if
it had been sent SIGTERM. A sweep's worker processes instead die with their parent
(``die_with_parent``) and are stopped by it (``imgpipe.sweep.worker``).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# A scheduler that signals a whole process group, and make passing the same signal on,
# deliver one stop twice within milliseconds: a repeat of SIGTERM this soon is the same
# request. A person's second Ctrl-C (SIGINT) always counts.
REPEAT_WINDOW_S = 1.0


class Stopped(BaseException):
    """Raised where a run stops on request. Not an ``Exception``, like KeyboardInterrupt:
    no ``except Exception`` on the way (Optuna's included) mistakes it for a failure."""

    def __init__(self, signum: int, where: str = "") -> None:
        # ``where``: the rest of the line after "stopped by SIGTERM", e.g. " after epoch 3: ..."
        super().__init__(signum, where)
        self.signum = signum
        self.where = where

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Flag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.at = 0.0
        self.immediate = False


_FLAG = _Flag()


def requested() -> bool:
    """True once a stop was asked for (cheap: called at every batch boundary)."""
    return _FLAG.signum is not None


def check(where: str = "") -> None:
    """Raise ``Stopped`` when a stop was asked for."""
    if _FLAG.signum is not None:
        raise Stopped(_FLAG.signum, where)


def stopped(where: str) -> Stopped:
    """The ``Stopped`` to raise for the stop that was asked for."""
    assert _FLAG.signum is not None, "no stop was asked for"
    return Stopped(_FLAG.signum, where)


def _on_signal(signum: int, frame: object) -> None:
    if _FLAG.signum is not None:
        if (
            signum == signal.SIGTERM == _FLAG.signum
            and time.monotonic() - _FLAG.at < REPEAT_WINDOW_S
        ):
            return
        os._exit(128 + signum)  # the second signal: now, no cleanup
    _FLAG.signum, _FLAG.at = signum, time.monotonic()
    log.warning(
        "%s: stopping at the next batch boundary (send it again to exit at once)",
        signal.Signals(signum).name,
    )
    if _FLAG.immediate:
        raise Stopped(signum)


def install(*, immediate: bool = False, watch_launchers: bool = True) -> None:
    """Take SIGTERM and SIGINT (from the main thread). ``immediate``: raise ``Stopped``
    wherever the program is, for commands whose outputs are all written atomically and
    that never look at the flag. ``watch_launchers``: stop when make or dvc above ends."""
    _FLAG.immediate = immediate
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    if watch_launchers:
        watch(launchers(ancestors()))


# --------------------------------------------------------------------------- launchers


def ancestors(limit: int = 12) -> list[tuple[int, str]]:
    """(pid, program name) of this process's ancestors, parent first (Linux; else empty)."""
    chain: list[tuple[int, str]] = []
    pid = os.getppid()
    while pid > 1 and len(chain) < limit:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        chain.append((pid, _program(argv)))
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the comm field may hold spaces
    return chain


def _program(argv: list[bytes]) -> str:
    """``make``, ``dvc`` (also as ``python .../dvc`` or ``python -m dvc``), or another name."""
    words = [os.path.basename(a.decode(errors="replace")) for a in argv if a]
    if not words:
        return ""
    if words[0].startswith("python") and len(words) > 1:
        rest = [w for w in words[1:] if not w.startswith("-") or w == "-m"]
        if rest[:1] == ["-m"]:
            rest = rest[1:]
        return rest[0] if rest else words[0]
    return "make" if words[0] == "gmake" else words[0]


def launchers(chain: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The ancestors whose end must stop this process: up to the nearest ``dvc``, else up
    to the nearest ``make``; none otherwise (a shell that ends after ``nohup`` must not)."""
    names = [name for _, name in chain]
    for launcher in ("dvc", "make"):
        if launcher in names:
            return chain[: names.index(launcher) + 1]
    return []


def watch(processes: list[tuple[int, str]]) -> None:
    """When any of ``processes`` ends, send this process SIGTERM (a daemon thread)."""
    fds = {}
    for pid, name in processes:
        try:
            fds[os.pidfd_open(pid)] = (pid, name)  # Linux >= 5.3: no pid reuse race
        except (AttributeError, OSError):
            continue
    if not fds:
        return

    def wait() -> None:
        ready, _, _ = select.select(list(fds), [], [])
        pid, name = fds[ready[0]]
        if not requested():
            log.warning("%s (pid %d) ended: stopping", name, pid)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="stop-watch", daemon=True).start()


def die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the parent (pid ``parent``) ends, even by SIGKILL
    (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
