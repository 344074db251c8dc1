"""The study's database going away mid-sweep: storage calls retried with backoff, the
trial's heartbeat kept up through the outage, and no neighbour judged dead because of it.

Optuna retries only ``ask`` on a database error; anything else surfaces as
``StorageInternalError`` (or the driver's ``OperationalError``), and the heartbeat thread
of ``Study.optimize`` stops silently on its first failure. So the worker runs its own
ask/tell loop and sends every storage call through ``retrying``: a PostgreSQL restart or a
database that stops answering for a while costs waiting, never a trial.

- ``retrying(fn)`` calls ``fn`` until it succeeds, backing off from 0.5 s to 5 s, for up to
  ``IMGPIPE_SWEEP_DB_WAIT_S`` seconds (default 300); then one line says the database is
  unreachable and to run the same command again (the study continues where it stopped).
- ``Heartbeat`` records the running trial's heartbeat every interval on a thread, through
  ``retrying``, so a trial whose worker is alive has a fresh heartbeat as soon as the
  database answers again.
- ``recently_cut_off()``: a worker that itself could not reach the database in the last
  grace period does not fail other trials as stale (their heartbeats could not arrive
  either); it waits until everyone has had a chance to beat again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from imgpipe.errors import PipelineError

log = logging.getLogger("imgpipe.sweep")

T = TypeVar("T")
WAIT_ENV = "IMGPIPE_SWEEP_DB_WAIT_S"
WAIT_S = 300.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 5.0
SLOW_S = 5.0  # a storage call slower than this means the database stalled

_state = {"outage_until": 0.0, "in_outage": False}
_lock = threading.Lock()


class StorageUnreachable(PipelineError):
    """The study's database did not answer within the wait budget."""


def database_errors() -> tuple[type[BaseException], ...]:
    """What a storage call raises while its database is unreachable."""
    import optuna
    import sqlalchemy.exc

    return (
        optuna.exceptions.StorageInternalError,
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.DisconnectionError,
        ConnectionError,
    )


def wait_budget_s() -> float:
    text = os.environ.get(WAIT_ENV, "").strip()
    try:
        return float(text) if text else WAIT_S
    except ValueError:
        raise PipelineError(f"{WAIT_ENV}={text!r}: expected seconds") from None


def _mark(outage: bool) -> None:
    with _lock:
        if outage and not _state["in_outage"]:
            log.warning("sweep storage is not answering: retrying with backoff")
        if not outage and _state["in_outage"]:
            log.warning("sweep storage answers again")
        _state["in_outage"] = outage
        if outage or _state["outage_until"]:  # the last moment it was seen down
            _state["outage_until"] = time.monotonic()


def recently_cut_off(grace_s: float) -> bool:
    """Whether this process saw the database unreachable within the last ``grace_s``."""
    with _lock:
        last = _state["outage_until"]
    return bool(last) and time.monotonic() - last < grace_s


def retrying(
    fn: Callable[[], T], *, what: str = "storage call", after_retry: Callable[[], T] | None = None
) -> T:
    """``fn()``, retried with backoff while the database is unreachable. ``after_retry``,
    if given, replaces ``fn`` once a first attempt has failed: for calls that may have
    taken effect although their answer was lost (telling a trial's end)."""
    errors = database_errors()
    deadline = time.monotonic() + wait_budget_s()
    delay = FIRST_DELAY_S
    call = fn
    while True:
        started = time.monotonic()
        try:
            result = call()
        except errors as exc:
            _mark(True)
            if time.monotonic() + delay > deadline:
                raise StorageUnreachable(
                    f"sweep storage unreachable for {wait_budget_s():.0f} s ({what}: "
                    f"{type(exc).__name__}); run the same command again to continue the study"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
            call = after_retry or fn
            continue
        if _state["in_outage"]:
            _mark(False)
        elif time.monotonic() - started > SLOW_S:
            # A database that stalls answers late rather than failing: heartbeats were held
            # up just as long, so this counts as an outage for the stale-trial check.
            with _lock:
                _state["outage_until"] = time.monotonic()
        return result


def note(trial: Any, key: str, value: Any) -> None:
    """``trial.set_user_attr`` through an outage (setting the same value twice is harmless)."""
    retrying(lambda: trial.set_user_attr(key, value), what=f"recording {key}")


class Heartbeat:
    """The running trial's heartbeat on a daemon thread, every ``interval_s``, retried."""

    def __init__(self, storage: Any, trial_id: int, interval_s: float) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s)

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                retrying(lambda: self.storage.record_heartbeat(self.trial_id), what="heartbeat")
            except PipelineError as exc:  # the worker's own next call says it, once
                log.warning("%s", exc)
                return
            self._stop.wait(self.interval_s)
