"""Optuna sweeps configured by the ``hydra.sweeper`` block of conf/train_model.yaml.

``python -u src/train_model.py --multirun`` (and ``make sweep``, the DVC stage)
lands here. The config block, the search-space syntax (``range``, ``choice``,
``interval``, ``tag(log, ...)``) and ``optimization_results.yaml`` are those of
Hydra's Optuna sweeper, parsed with the sweeper's own functions. The loop is
ours, because the sweeper's waits for the slowest trial of each batch, runs
``n_jobs`` in one process, and counts ``n_trials`` per process:

- every worker is a process with its share of the CPU threads, and takes the
  next trial as soon as it finishes one;
- the study lives in Optuna's storage (SQLite by default, PostgreSQL across
  machines): it is the only coordinator. Workers anywhere stop when the study
  holds ``n_trials`` finished trials in total;
- a trial whose worker died is failed (at once when the process was on this
  machine, after the heartbeat's grace period otherwise) and retried with the
  same params, resuming its own checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
import multiprocessing
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.atomic import atomic_dir
from imgpipe.config import TrainConfig, conf_dir, to_schema
from imgpipe.errors import PipelineError
from imgpipe.tracking import HPTUNING_TAG_ENV, redact_url, resolve_tracking_uri

log = logging.getLogger(__name__)
# Heartbeats and retries are "experimental" in Optuna since 2.x; we rely on them on purpose.
warnings.filterwarnings(
    "ignore", message=r".*(is experimental \(supported from v|is an experimental feature)"
)
warnings.filterwarnings(
    "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
)

OBJECTIVE_NAMES = ("test/loss", "test/accuracy")  # what train() returns, in order
HEARTBEAT_S = 10
READY_WAIT_S = 60
GRACE_S = 40
POLL_S = 1.0


@dataclass
class SweepSettings:
    """Everything a worker needs, in plain types (workers are spawned processes)."""

    study_name: str
    storage: str
    directions: list[str]
    n_trials: int
    n_jobs: int
    sampler: dict[str, Any]
    search_space: dict[str, str]  # name -> override text, e.g. "range(0.9,1.7,step=0.1)"
    base: dict[str, Any]  # TrainConfig fields for every trial
    results_dir: str
    study_dir: str
    hptuning_tag: str = ""
    parent_run_id: str | None = None
    threads_per_worker: int = 1
    shared_storage: bool = False
    fingerprint: str = ""


# --------------------------------------------------------------------------- config


def _distributions(search_space: dict[str, str]) -> dict[str, Any]:
    """Parse the search space with the Optuna sweeper's own rules; one line per mistake."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import (
        BaseDistribution,
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    parser = OverridesParser.create()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    result: dict[str, BaseDistribution] = {}
    for name, text in search_space.items():
        where = f"hydra.sweeper.params.{name}"
        if name not in known:
            raise PipelineError(
                f"{where}: unknown parameter '{name}' (not a key of conf/train_model.yaml)"
            )
        try:
            (override,) = parser.parse_overrides([f"{name}={text}"])
            dist = create_optuna_distribution_from_override(override)
        except (HydraException, ValueError, AssertionError, NotImplementedError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PipelineError(f"{where}: malformed search space {text!r} ({message})") from None
        if not isinstance(dist, BaseDistribution):
            raise PipelineError(
                f"{where}: {text!r} is a single value, not a range, choice or interval"
            )
        single = (isinstance(dist, CategoricalDistribution) and len(dist.choices) < 2) or (
            isinstance(dist, FloatDistribution | IntDistribution) and dist.low == dist.high
        )
        if single:
            raise PipelineError(
                f"{where}: {text!r} has a single value; over floats use interval(a,b) "
                "or give range a step: range(a,b,step=s)"
            )
        result[name] = dist
    return result


# The keys that change what a trial computes; paths and tracking settings do not,
# so workers on several machines with their own paths still join one study.
FINGERPRINT_KEYS = ("lr", "gamma", "train_bs", "test_bs", "epochs", "seed")


def code_hash() -> str:
    """The training code's identity: trials made by other code are not reused."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def sweep_fingerprint(base: dict[str, Any], space: dict[str, str], directions: list[str]) -> str:
    key = {
        "base": {k: base[k] for k in FINGERPRINT_KEYS if k not in space},
        "space": dict(sorted(space.items())),
        "directions": directions,
        "code": code_hash(),
    }
    return hashlib.sha256(repr(key).encode()).hexdigest()[:8]


def load_settings(
    config_name: str, file_overrides: list[str], cli_args: list[str]
) -> SweepSettings:
    """Compose conf/ with the overrides; split them into the search space and fixed values."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    source = f"conf/{config_name}.yaml"
    try:
        parsed = OverridesParser.create().parse_overrides(cli_args)
    except HydraException as exc:
        raise PipelineError(f"malformed override: {str(exc).splitlines()[0]}") from None
    cli_space = {
        o.get_key_element(): o.input_line.split("=", 1)[1] for o in parsed if o.is_sweep_override()
    }
    cli_fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    try:
        with initialize_config_dir(str(conf_dir())):
            cfg = compose(config_name, overrides=cli_fixed, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise PipelineError(f"{source}: {str(exc).splitlines()[0]}") from None
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    results_dir = str(cfg.hydra.sweep.dir)
    space = {k: str(v) for k, v in (sweeper.get("params") or {}).items()} | cli_space
    fixed_keys = {o.get_key_element() for o in parsed if not o.is_sweep_override()}
    for key in fixed_keys & set(space):  # a fixed value on the command line wins, as in Hydra
        del space[key]
    _distributions(space)  # validate now, before any study or trial exists

    # Base values: conf/ < params file (keys not searched) < command line.
    base_cfg = OmegaConf.to_container(cfg, resolve=False)
    base_cfg.pop("hydra", None)
    if file_overrides:
        searched = set(space)
        kept = [o for o in file_overrides if o.split("=", 1)[0] not in searched | fixed_keys]
        with initialize_config_dir(str(conf_dir())):
            layered = compose(config_name, overrides=kept + cli_fixed)
        base_cfg = OmegaConf.to_container(layered, resolve=True)
    base = dataclasses.asdict(to_schema(TrainConfig, base_cfg, source))

    directions = sweeper.get("direction") or ["minimize", "maximize"]
    directions = [directions] if isinstance(directions, str) else list(directions)
    bad = [d for d in directions if d not in ("minimize", "maximize")]
    if bad or len(directions) not in (1, 2):
        raise PipelineError(
            f"{source}: hydra.sweeper.direction must be minimize/maximize, one or two of them"
        )
    n_trials = int(sweeper.get("n_trials") or 0)
    n_jobs = int(sweeper.get("n_jobs") or 1)
    if n_trials < 1 or n_jobs < 1:
        raise PipelineError(f"{source}: hydra.sweeper.n_trials and n_jobs must be >= 1")
    # Next to the results: the study database and one folder per trial (a persisted DVC output).
    study_name = str(sweeper.get("study_name") or "sweep")
    fingerprint = sweep_fingerprint(base, space, directions)
    # One folder per (study, config, code): the database when no storage is given, and
    # one folder per trial. A changed config, search space or training code starts a
    # new study; the same one (say, after a kill, or with more n_trials) continues it.
    study_dir = Path(results_dir).resolve().parent / "study" / f"{study_name}-{fingerprint}"
    storage = sweeper.get("storage") or f"sqlite:///{study_dir / 'optuna.db'}"
    from imgpipe.data import available_cpus

    return SweepSettings(
        study_name=study_name,
        storage=str(storage),
        directions=directions,
        n_trials=n_trials,
        n_jobs=n_jobs,
        sampler={k: v for k, v in (sweeper.get("sampler") or {}).items() if v is not None},
        search_space=space,
        base=base,
        results_dir=str(Path(results_dir).resolve()),
        study_dir=str(study_dir),
        threads_per_worker=max(1, available_cpus() // n_jobs),
        shared_storage=not str(storage).startswith(("sqlite", "journal:")),
        fingerprint=fingerprint,
    )


# --------------------------------------------------------------------------- study


def open_storage(url: str):
    """Optuna storage for ``url``: RDB with heartbeats (retrying dead workers' trials),
    or a journal file for ``journal:PATH``."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    last: Exception | None = None
    for attempt in range(5):  # workers racing to create the tables: the losers retry
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
        except ImportError as exc:
            raise PipelineError(
                f"sweep storage {redact_url(url)}: database driver missing ({exc.name})"
            ) from None
        except Exception as exc:  # sqlalchemy raises many types for a bad or unreachable URL
            last = exc
            text = str(exc).lower()
            if "already exists" in text or "locked" in text:
                time.sleep(0.2 * (attempt + 1))
                continue
            break
    reason = str(last).splitlines()[0] if last else "unknown error"
    raise PipelineError(f"sweep storage {redact_url(url)} is unusable: {_redact_text(reason, url)}")


def _redact_text(text: str, url: str) -> str:
    from urllib.parse import urlsplit

    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


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
                reason = _redact_text(str(exc).splitlines()[0], settings.storage)
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


# --------------------------------------------------------------------------- workers


@dataclass
class Census:
    finished: int
    running: int
    waiting: int


def census(study) -> Census:
    from optuna.trial import TrialState

    finished = running = waiting = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE or (
            t.state == TrialState.FAIL and "failure" in t.user_attrs
        ):
            finished += 1
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
    return Census(finished, running, waiting)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_local_trials(study) -> None:
    """Fail (and retry) RUNNING trials whose worker process on this machine is gone.

    Trials of other machines are failed by Optuna's heartbeat check instead,
    once their heartbeat is older than the grace period.
    """
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _pid_alive(int(t.user_attrs.get("pid", -1))):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        log.warning(
            "trial %d: its worker (pid %s) died; retrying it", t.number, t.user_attrs.get("pid")
        )
        RetryHeartbeatStaleTrialCallback(max_retry=3)(study, study._storage.get_trial(t._trial_id))


def worker_seed(settings: SweepSettings, index: int) -> int | None:
    """Worker 0 of a local study keeps the configured seed (reproducible); every other
    worker, and every worker on shared storage, mixes in its host, index and pid."""
    base = settings.sampler.get("seed")
    if base is None:
        return None
    if index == 0 and not settings.shared_storage:
        return int(base)
    key = f"{base}:{socket.gethostname()}:{index}:{os.getpid()}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


def make_sampler(settings: SweepSettings, index: int):
    """The configured sampler (``_target_`` must be an Optuna sampler) with this worker's seed."""
    import optuna
    from hydra.utils import get_class

    spec = dict(settings.sampler)
    target = spec.pop("_target_", "optuna.samplers.TPESampler")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)):
        raise PipelineError(f"hydra.sweeper.sampler._target_: {target} is not an Optuna sampler")
    spec["seed"] = worker_seed(settings, index)
    try:
        return cls(**spec)
    except TypeError as exc:
        raise PipelineError(f"hydra.sweeper.sampler: {exc}") from None


def _trial_config(settings: SweepSettings, trial, params: dict[str, Any]) -> TrainConfig:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    home = Path(settings.study_dir) / "trials" / str(origin if origin is not None else trial.number)
    values = (
        settings.base
        | params
        | {
            "model_checkpoint_dir_path": str(home / "models"),
            "live_dir_path": str(home / "dvclive"),
            "mlflow_run_name": f"trial-{trial.number}",
            # A retry continues its own trial's checkpoint; a new trial never reads another's.
            "resume": origin is not None,
        }
    )
    return to_schema(TrainConfig, values, f"trial {trial.number}")


def run_worker(settings: SweepSettings, index: int) -> int:
    """Take trials from the study until it holds ``n_trials`` finished ones; return how many ran."""
    import optuna
    import torch

    from imgpipe.train import train

    torch.set_num_threads(settings.threads_per_worker)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(settings.storage)
    study = optuna.load_study(
        study_name=settings.study_name, storage=storage, sampler=make_sampler(settings, index)
    )
    distributions = _distributions(settings.search_space)
    if settings.hptuning_tag:
        os.environ[HPTUNING_TAG_ENV] = settings.hptuning_tag
    ran = 0

    def objective(trial) -> tuple[float, ...]:
        # Only the first n_trials live trials may run: trial numbers are handed out
        # atomically by the storage, so racing workers agree on which one is surplus.
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        earlier = sum(
            1
            for t in study.get_trials(deepcopy=False)
            if t.number < trial.number
            and (
                t.state == optuna.trial.TrialState.COMPLETE
                or t.state == optuna.trial.TrialState.RUNNING
                or (t.state == optuna.trial.TrialState.FAIL and "failure" in t.user_attrs)
            )
        )
        if earlier >= settings.n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("study already has n_trials trials")
        started = time.perf_counter()
        try:
            params = {name: trial._suggest(name, dist) for name, dist in distributions.items()}
            cfg = _trial_config(settings, study._storage.get_trial(trial._trial_id), params)
            log.info("trial %d (worker %d): %s", trial.number, index, params)
            timings: dict[str, float] = {}
            values = train(
                cfg,
                timings=timings,
                parent_run_id=settings.parent_run_id,
                extra_tags={"trial_number": str(trial.number), "optuna_study": settings.study_name},
                on_run=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
            )
        except Exception as exc:  # Ctrl-C is not a failure: that trial is retried next time
            # Recorded before Optuna marks the trial FAIL: a genuine failure counts
            # towards n_trials, unlike a trial whose worker died (that one is retried).
            trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}"[:500])
            trial.set_user_attr("duration_s", round(time.perf_counter() - started, 3))
            log.warning("trial %d failed: %s", trial.number, exc)
            raise
        trial.set_user_attr("duration_s", round(time.perf_counter() - started, 3))
        trial.set_user_attr("train_s", round(timings.get("epochs_s", 0.0), 3))
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr("failure", f"non-finite objective {values}")  # Optuna fails it
        return tuple(values)[: len(settings.directions)]

    while True:
        if ran > 3 * settings.n_trials + 10:  # a bug, not a sweep: never spin forever
            raise PipelineError(
                f"sweep worker {index} ran {ran} trials without the study finishing"
            )
        optuna.storages.fail_stale_trials(study)
        fail_dead_local_trials(study)
        now = census(study)
        if now.finished >= settings.n_trials:
            break
        if now.finished + now.running >= settings.n_trials and not now.waiting:
            time.sleep(POLL_S)  # the last trials are running elsewhere; one may still fail stale
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,))
        ran += 1
    return ran


def _worker_entry(settings: SweepSettings, index: int, log_dir: str) -> None:
    from imgpipe.logs import setup_logging

    setup_logging(log_dir)
    try:
        run_worker(settings, index)
    except PipelineError as exc:
        log.error("worker %d: %s", index, exc)
        raise SystemExit(2) from None


def run_workers(settings: SweepSettings) -> None:
    """Worker 0 in this process when alone; otherwise ``n_jobs`` spawned processes."""
    if settings.n_jobs == 1:
        run_worker(settings, 0)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker_entry,
            args=(settings, i, settings.base["log_dir"]),
            name=f"sweep-worker-{i}",
        )
        for i in range(settings.n_jobs)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    bad = [p.name for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise PipelineError(
            f"sweep worker(s) {', '.join(bad)} exited abnormally; see {settings.base['log_dir']}"
        )


# --------------------------------------------------------------------------- results


def best_trial(study, directions: list[str]):
    """The documented rule: among the Pareto-optimal trials, the best on the first
    objective (test loss by default), ties broken by the second (test accuracy)."""
    sign = [1 if d == "minimize" else -1 for d in directions]
    front = study.best_trials
    if not front:
        return None
    return min(front, key=lambda t: tuple(s * v for s, v in zip(sign, t.values, strict=False)))


def trials_table(study) -> tuple[list[str], list[list[Any]]]:
    names = list(study.metric_names or OBJECTIVE_NAMES)
    trials = study.get_trials(deepcopy=False)
    param_names = sorted({p for t in trials for p in t.params})
    header = [
        "number",
        "state",
        *(f"params_{p}" for p in param_names),
        *(f"values_{n.replace('/', '_')}" for n in names),
        "duration_s",
        "mlflow_run_id",
        "failure",
    ]
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        values = list(t.values) if t.values else [None] * len(names)
        rows.append(
            [
                t.number,
                t.state.name,
                *(t.params.get(p) for p in param_names),
                *values,
                t.user_attrs.get("duration_s"),
                t.user_attrs.get("mlflow_run_id", ""),
                t.user_attrs.get("failure", ""),
            ]
        )
    return header, rows


def plot_front(study, directions: list[str], path: Path) -> None:
    """The Pareto front as a PNG (matplotlib's Agg backend: no display, no network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    names = list(study.metric_names or OBJECTIVE_NAMES)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    if len(directions) == 2:
        for group, style in (
            (False, {"c": "#9aa5b1", "label": "trial"}),
            (True, {"c": "#d64545", "label": "Pareto front"}),
        ):
            pts = [t for t in done if (t.number in best) == group]
            ax.scatter([t.values[0] for t in pts], [t.values[1] for t in pts], **style)
            for t in pts:
                ax.annotate(
                    str(t.number),
                    (t.values[0], t.values[1]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xlabel(f"{names[0]} ({directions[0]})")
        ax.set_ylabel(f"{names[1]} ({directions[1]})")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.plot([t.number for t in done], [t.values[0] for t in done], "o-", c="#3b6ea5")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{names[0]} ({directions[0]})")
    ax.set_title(f"study {study.study_name}: {len(done)} complete trials")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(study, settings: SweepSettings) -> dict[str, Any]:
    """Write the results folder atomically; return the best trial's summary."""
    import yaml

    directions = settings.directions
    best = best_trial(study, directions)
    if best is None:
        raise PipelineError(
            f"all trials of study {settings.study_name!r} failed; see the 'failure' column "
            f"with `optuna trials` or the logs in {settings.base['log_dir']}"
        )
    if len(directions) == 1:
        optimization = {"name": "optuna", "best_params": best.params, "best_value": best.values[0]}
    else:
        optimization = {
            "name": "optuna",
            "solutions": [
                {"params": t.params, "values": list(t.values)} for t in study.best_trials
            ],
        }
    names = list(study.metric_names or OBJECTIVE_NAMES)
    best_doc = {
        "rule": "Pareto-optimal trial with the best first objective, ties broken by the second",
        "trial": best.number,
        "params": best.params,
        "values": dict(zip(names, best.values, strict=False)),
        "mlflow_run_id": best.user_attrs.get("mlflow_run_id", ""),
    }
    with atomic_dir(settings.results_dir) as tmp:
        (tmp / "optimization_results.yaml").write_text(
            yaml.safe_dump(optimization, sort_keys=False)
        )
        (tmp / "best_params.yaml").write_text(yaml.safe_dump(best_doc, sort_keys=False))
        header, rows = trials_table(study)
        with open(tmp / "trials.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        plot_front(study, directions, tmp / "pareto_front.png")
    return best_doc


# --------------------------------------------------------------------------- driver


def _parent_run(settings: SweepSettings, existing: str | None) -> str | None:
    """The sweep's MLflow parent run: ``existing`` when this store has it, else a new one."""
    if not settings.base["setup_mlflow"]:
        return None
    import mlflow
    from mlflow import MlflowClient

    from imgpipe.tracking import check_tracking_uri, ensure_experiment, run_tags

    uri = resolve_tracking_uri(settings.base["mlflow_tracking_uri"])
    check_tracking_uri(uri)
    client = MlflowClient(uri)
    if existing:
        try:
            client.get_run(existing)
            return existing
        except mlflow.exceptions.MlflowException:
            log.warning(
                "parent run %s of study %r is not in %s: starting a new one",
                existing,
                settings.study_name,
                redact_url(uri),
            )
    experiment_id = ensure_experiment(uri, settings.base["mlflow_exp_name"])
    name = f"sweep-{settings.study_name}"
    tags = run_tags() | {"hptuning_tag": settings.hptuning_tag, "optuna_study": settings.study_name}
    run = client.create_run(experiment_id, tags=tags, run_name=name)
    client.log_batch(
        run.info.run_id,
        params=[
            mlflow.entities.Param("n_trials", str(settings.n_trials)),
            mlflow.entities.Param("directions", ",".join(settings.directions)),
            mlflow.entities.Param("storage", redact_url(settings.storage)),
            *(mlflow.entities.Param(f"space.{k}", v) for k, v in settings.search_space.items()),
        ],
    )
    return run.info.run_id


def _completed_ms(study: Any, best: dict[str, Any] | None) -> int:
    """When the best trial completed, in ms since the epoch: the same on every machine of
    one time zone (Optuna stores the writer's naive local time; read as local here, so the
    parent run shows the right time; machines in other zones add their own point)."""
    if best is None:
        return 0
    for t in study.get_trials(deepcopy=False):
        if t.number == best["trial"] and t.datetime_complete is not None:
            return int(t.datetime_complete.timestamp() * 1000)
    return 0


def _finish_parent(
    settings: SweepSettings, best: dict[str, Any] | None, status: str, best_at_ms: int
) -> None:
    """Record the best trial on the parent run and end it.

    Every machine of a shared study gets here once the study is done, at about the same
    moment and with the same best trial, so the writes must be idempotent and tolerate each
    other: the tags and metrics go in one ``log_batch`` (MLflow's store retries concurrent
    tag inserts there, not in ``set_tag``) and the metrics carry the best trial's completion
    time as their timestamp, so the machines write identical rows and the run keeps one.
    """
    if not settings.parent_run_id:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(resolve_tracking_uri(settings.base["mlflow_tracking_uri"]))
    if best is not None:
        tags = {
            "best_trial": str(best["trial"]),
            "best_mlflow_run_id": best["mlflow_run_id"],
            **{f"best_params.{key}": str(value) for key, value in best["params"].items()},
        }
        client.log_batch(
            settings.parent_run_id,
            metrics=[
                Metric(f"best/{key.split('/')[-1]}", value, best_at_ms, 0)
                for key, value in best["values"].items()
            ],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        for name in (
            "optimization_results.yaml",
            "best_params.yaml",
            "trials.csv",
            "pareto_front.png",
        ):
            client.log_artifact(
                settings.parent_run_id, str(Path(settings.results_dir) / name), "sweep"
            )
    client.set_terminated(settings.parent_run_id, status=status)


def run_sweep(settings: SweepSettings) -> dict[str, Any]:
    """Open (or create) the study, run workers until it is done, write the results."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(settings.storage)
    study, created = create_or_load_study(settings, storage)
    prepare_study(settings, study, created)
    before = census(study)
    log.info(
        "sweep %r in %s: %d/%d trials finished, %d worker(s) x %d thread(s), hptuning_tag=%s",
        settings.study_name,
        redact_url(settings.storage),
        before.finished,
        settings.n_trials,
        settings.n_jobs,
        settings.threads_per_worker,
        settings.hptuning_tag,
    )
    status = "FAILED"
    best = None
    best_at_ms = 0
    try:
        run_workers(settings)
        best = write_results(study, settings)
        best_at_ms = _completed_ms(study, best)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _finish_parent(settings, best, status, best_at_ms)
    failed = sum(1 for t in study.get_trials(deepcopy=False) if "failure" in t.user_attrs)
    log.info(
        "sweep done: best trial %d %s -> %s (%d failed); results in %s",
        best["trial"],
        best["params"],
        best["values"],
        failed,
        settings.results_dir,
    )
    return best
