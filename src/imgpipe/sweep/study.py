"""The study in Optuna's storage: opening it, joining it, counting its trials, failing dead ones."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.errors import PipelineError
from imgpipe.metrics import OBJECTIVE_NAMES
from imgpipe.redact import redact_text, redact_url
from imgpipe.sweep.settings import SweepSettings
from imgpipe.tracking.parent import open_parent_run
from imgpipe.tracking.store import HPTUNING_TAG_ENV

log = logging.getLogger(__package__)  # the sweep's lines read "imgpipe.sweep: ..."

HEARTBEAT_S = 10
READY_WAIT_S = 60
GRACE_S = 40
# Where the defaults do not fit (a slow shared database, or a test that must not wait
# 40 s for a dead machine), every worker of a study should set the same values.
HEARTBEAT_ENV = "IMGPIPE_SWEEP_HEARTBEAT_S"
GRACE_ENV = "IMGPIPE_SWEEP_GRACE_S"
MAX_RETRY = 3  # how often a trial whose worker died is retried


# --------------------------------------------------------------------------- storage


def open_storage(url: str):
    """Optuna storage for ``url``: RDB with heartbeats (retrying dead workers' trials),
    or a journal file for ``journal:PATH``."""
    if url.startswith("journal:"):
        return _journal_storage(Path(url.removeprefix("journal:")))
    if (db := sqlite_path(url)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    heartbeat = seconds_from_env(HEARTBEAT_ENV, HEARTBEAT_S)
    grace = seconds_from_env(GRACE_ENV, GRACE_S)
    if grace <= heartbeat:  # a live worker would be judged dead between two heartbeats
        raise PipelineError(f"{GRACE_ENV}={grace} must be above {HEARTBEAT_ENV}={heartbeat}")
    last: Exception | None = None
    for attempt in range(5):  # workers racing to create the tables: the losers retry
        try:
            return _rdb_storage(url, heartbeat, grace)
        except ImportError as exc:
            raise PipelineError(
                f"sweep storage {redact_url(url)}: database driver missing ({exc.name})"
            ) from None
        except Exception as exc:  # sqlalchemy raises many types for a bad or unreachable URL
            last = exc
            text = str(exc).lower()
            # Processes creating the same new database at once: the loser of the race
            # sees a table or alembic's version row being created; it retries and joins.
            if any(w in text for w in ("already exists", "locked", "unique constraint")):
                time.sleep(0.2 * (attempt + 1))
                continue
            break
    reason = str(last).splitlines()[0] if last else "unknown error"
    raise PipelineError(f"sweep storage {redact_url(url)} is unusable: {redact_text(reason, url)}")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (``sqlite:///rel``, ``sqlite:////abs``, a driver,
    a query string); None for another storage or an in-memory database."""
    found = re.match(r"sqlite(\+\w+)?:///([^?]*)", url)
    if not found or found.group(2) in ("", ":memory:"):
        return None
    return Path(found.group(2))


@contextlib.contextmanager
def claiming(url: str) -> Iterator[None]:
    """Hold the claim lock of a SQLite study while this process takes a trial or fails a
    dead one, so exactly one process does each. Optuna moves a trial from WAITING to
    RUNNING (or from RUNNING to FAIL) after reading its state under SELECT ... FOR UPDATE,
    which SQLite does not lock: two processes reading at once both won, and both ran the
    same retried trial. PostgreSQL locks the row and the journal file appends under its
    own lock, so they need nothing here. The lock is a file beside the database (every
    process on the file, containers sharing its folder included, sees it), never the
    database file itself: closing a descriptor of that file drops SQLite's own locks."""
    db = sqlite_path(url)
    if db is None:  # not SQLite, or in this process only
        yield
        return
    with open(db.with_name(db.name + ".claims.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _journal_storage(path: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def grace_seconds() -> float:
    """How old a heartbeat may be before its trial counts as dead (the storage's grace)."""
    return float(seconds_from_env(GRACE_ENV, GRACE_S))


def seconds_from_env(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise PipelineError(f"{name}={text!r}: expected a whole number of seconds above 0")
    return value


def _rdb_storage(url: str, heartbeat: int, grace: int):
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    return RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat,
        grace_period=grace,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
            max_retry=MAX_RETRY, inherit_intermediate_values=True
        ),
    )


# --------------------------------------------------------------------------- the study


def create_or_load_study(settings: SweepSettings, storage: Any) -> tuple[Any, bool]:
    """Create the study, or load it when it exists; True when this process created it.

    ``create_study`` is atomic in the storage, so among workers racing on a new
    study exactly one learns it is the creator.
    """
    import optuna

    for attempt in range(5):
        try:
            study = optuna.create_study(
                study_name=settings.study_name, storage=storage, directions=settings.directions
            )
            created = True
            break
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=settings.study_name, storage=storage)
            created = False
            break
        except Exception as exc:  # tables being created by a concurrent worker, a locked file
            if attempt == 4:
                reason = redact_text(str(exc).splitlines()[0], settings.storage)
                raise PipelineError(
                    f"cannot create or load study {settings.study_name!r} in "
                    f"{redact_url(settings.storage)}: {reason}"
                ) from None
            time.sleep(0.3 * (attempt + 1))
    existing = [d.name.lower() for d in study.directions]
    if existing != settings.directions:
        raise PipelineError(
            f"study {settings.study_name!r} in {redact_url(settings.storage)} optimises "
            f"{existing}, but hydra.sweeper.direction says {settings.directions}; "
            "use another study_name or storage"
        )
    return study, created


def prepare_study(settings: SweepSettings, study: Any, created: bool) -> None:
    """The creator records the sweep's identity (config fingerprint, hptuning tag, MLflow
    parent run) in the study; everyone else waits for it and joins."""
    if not created:
        deadline = time.monotonic() + READY_WAIT_S
        while not study.user_attrs.get("ready") and time.monotonic() < deadline:
            time.sleep(0.5)
    attrs = study.user_attrs
    if attrs.get("ready"):
        if attrs.get("config_fingerprint") != settings.fingerprint:
            raise PipelineError(
                f"study {settings.study_name!r} in {redact_url(settings.storage)} was run with "
                "another training config or search space; use another study_name (or the same config)"
            )
        settings.hptuning_tag = os.environ.get(HPTUNING_TAG_ENV) or attrs.get("hptuning_tag", "")
        settings.parent_run_id = _parent_run(settings, attrs.get("mlflow_parent_run_id"))
        return
    # Ours, or a study made by hand (or by a creator that died before finishing): adopt it.
    study.set_metric_names(list(OBJECTIVE_NAMES[: len(settings.directions)]))
    study.set_user_attr("config_fingerprint", settings.fingerprint)
    settings.hptuning_tag = os.environ.get(HPTUNING_TAG_ENV) or str(int(time.time()))
    study.set_user_attr("hptuning_tag", settings.hptuning_tag)
    settings.parent_run_id = _parent_run(settings, None)
    study.set_user_attr("mlflow_parent_run_id", settings.parent_run_id)
    study.set_user_attr("ready", True)


def _parent_run(settings: SweepSettings, existing: str | None) -> str | None:
    """The sweep's MLflow parent run (``existing`` when the store has it), or None without MLflow."""
    if not settings.base["setup_mlflow"]:
        return None
    params = {
        "n_trials": str(settings.n_trials),
        "directions": ",".join(settings.directions),
        "storage": redact_url(settings.storage),
        **{f"space.{k}": v for k, v in settings.search_space.items()},
    }
    return open_parent_run(
        settings.base["mlflow_tracking_uri"],
        settings.base["mlflow_exp_name"],
        settings.study_name,
        hptuning_tag=settings.hptuning_tag,
        params=params,
        existing=existing,
    )


# --------------------------------------------------------------------------- trials


@dataclass
class Census:
    finished: int
    running: int
    waiting: int


def counts_towards_n_trials(trial: Any) -> bool:
    """Complete, pruned (by the pruner, not as surplus), or failed for a reason of its own
    (a trial whose worker died or was stopped is retried instead)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.PRUNED:
        return not trial.user_attrs.get("surplus")
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and "failure" in trial.user_attrs
    )


def census(study) -> Census:
    from optuna.trial import TrialState

    finished = running = waiting = 0
    for t in study.get_trials(deepcopy=False):
        if counts_towards_n_trials(t):
            finished += 1
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
    return Census(finished, running, waiting)


# --------------------------------------------------------------------------- workers' identity


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""


def worker_identity() -> dict[str, Any]:
    """What tells this worker apart, kept on each trial it runs: the host name (for people),
    and the boot id, the PID namespace and the pid (for the dead-worker check). Two workers
    under one host name in different PID namespaces (a container with host networking,
    ``unshare --pid``) may share a pid number; they never share the namespace."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
    }


# The trial whose worker the identity attributes describe. A retried trial inherits its dead
# worker's attributes (Optuna's retry copies them), so until the worker that takes it has
# recorded itself, its pid is the dead one's: only an identity recorded for this trial
# number (written last) may judge it.
IDENTITY_OF = "identity_of_trial"


def trial_identity(number: int) -> dict[str, Any]:
    """What the worker running trial ``number`` records on it, ``IDENTITY_OF`` last."""
    return worker_identity() | {IDENTITY_OF: number}


def _own_identity(trial: Any) -> bool:
    return trial.user_attrs.get(IDENTITY_OF) == trial.number


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def died_here(attrs: dict[str, Any], me: dict[str, Any]) -> bool:
    """Whether the worker named by a trial's ``attrs`` ran in this machine's boot and this
    PID namespace, and its process is gone. Anything else is left to the heartbeat."""
    if not me["boot_id"] or not me["pid_ns"]:  # no /proc: only the heartbeat can tell
        return False
    same = attrs.get("boot_id") == me["boot_id"] and attrs.get("pid_ns") == me["pid_ns"]
    return same and not _pid_alive(int(attrs.get("pid", -1)))


def orphaned(trial: Any) -> bool:
    """A RUNNING trial no worker ever claimed (its creation committed while the answer was
    lost in a database outage): no worker identity long after it started."""
    import datetime

    if _own_identity(trial) or trial.datetime_start is None:
        return False
    age = datetime.datetime.now() - trial.datetime_start  # the storage's naive local time
    return age.total_seconds() > 3 * grace_seconds()


def fail_and_retry(study, storage, number: int) -> bool:
    """FAIL the RUNNING trial ``number`` (without a ``failure``: it does not count) and queue
    its retry; False when another worker got there first. Through the storage object this
    worker opened (public ``BaseStorage`` methods), so exactly one worker wins the race."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    try:
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker got there first
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)(
        study, storage.get_trial(trial_id)
    )
    return True


def fail_dead_local_trials(study, storage) -> None:
    """Fail (and retry) RUNNING trials whose worker process on this machine, in this PID
    namespace, is gone. Other workers' trials are failed by Optuna's heartbeat check
    instead, once their heartbeat is older than the grace period."""
    from optuna.trial import TrialState

    me = worker_identity()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if orphaned(t) and fail_and_retry(study, storage, t.number):
            log.warning("trial %d was never taken by a worker; queueing it again", t.number)
        elif (
            _own_identity(t)
            and died_here(t.user_attrs, me)
            and fail_and_retry(study, storage, t.number)
        ):
            log.warning(
                "trial %d: its worker (pid %s) died; retrying it",
                t.number,
                t.user_attrs.get("pid"),
            )
