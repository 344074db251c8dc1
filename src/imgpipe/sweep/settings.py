"""What a sweep runs: its settings, the search space, and the study's fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.config import TrainConfig, conf_dir, result_keys, to_schema
from imgpipe.cpus import available_cpus
from imgpipe.errors import PipelineError

# What a trial returns, in order: validation metrics. Test is measured once per trial and
# only reported (user attrs, the parent run), so the chosen trial's test score is unbiased.
OBJECTIVE_NAMES = ("val/loss", "val/accuracy")
TEST_NAMES = ("test/loss", "test/accuracy")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/imgpipe

# The keys that change what a trial computes; paths and tracking settings do not,
# so workers on several machines with their own paths still join one study.
FINGERPRINT_KEYS = result_keys()


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


# --------------------------------------------------------------------------- search space


def _distributions(search_space: dict[str, str]) -> dict[str, Any]:
    """Parse the search space with the Optuna sweeper's own rules; one line per mistake."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    result = {}
    for name, text in search_space.items():
        where = f"hydra.sweeper.params.{name}"
        if name not in known:
            raise PipelineError(
                f"{where}: unknown parameter '{name}' (not a key of conf/train_model.yaml)"
            )
        result[name] = _distribution(parser, where, name, text)
    return result


def _distribution(parser: Any, where: str, name: str, text: str) -> Any:
    """One search-space entry as an Optuna distribution with at least two values."""
    from hydra.errors import HydraException
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import (
        BaseDistribution,
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    try:
        (override,) = parser.parse_overrides([f"{name}={text}"])
        dist = create_optuna_distribution_from_override(override)
    except (HydraException, ValueError, AssertionError, NotImplementedError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"{where}: malformed search space {text!r} ({message})") from None
    if not isinstance(dist, BaseDistribution):
        raise PipelineError(f"{where}: {text!r} is a single value, not a range, choice or interval")
    single = (isinstance(dist, CategoricalDistribution) and len(dist.choices) < 2) or (
        isinstance(dist, FloatDistribution | IntDistribution) and dist.low == dist.high
    )
    if single:
        raise PipelineError(
            f"{where}: {text!r} has a single value; over floats use interval(a,b) "
            "or give range a step: range(a,b,step=s)"
        )
    return dist


# --------------------------------------------------------------------------- fingerprint


def code_hash() -> str:
    """The training code's identity: trials made by other code are not reused.

    Every module of the package counts, subpackages included (a change in the data,
    tracking or sweep code may change what a trial computes), but the test harness,
    which no trial runs."""
    digest = hashlib.sha256()
    files = sorted(
        (p.relative_to(PACKAGE_DIR).as_posix(), p)
        for p in PACKAGE_DIR.rglob("*.py")
        if p.name != "testing.py"
    )
    for name, path in files:
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def sweep_fingerprint(base: dict[str, Any], space: dict[str, str], directions: list[str]) -> str:
    key = {
        "base": {k: base[k] for k in FINGERPRINT_KEYS if k not in space},
        "space": dict(sorted(space.items())),
        "directions": directions,
        "code": code_hash(),
    }
    return hashlib.sha256(repr(key).encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- settings


def load_settings(
    config_name: str, file_overrides: list[str], cli_args: list[str]
) -> SweepSettings:
    """Compose conf/ with the overrides; split them into the search space and fixed values."""
    from omegaconf import OmegaConf

    source = f"conf/{config_name}.yaml"
    cli_space, cli_fixed, fixed_keys = _split_overrides(cli_args)
    cfg = _compose(config_name, cli_fixed, source, return_hydra_config=True)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    results_dir = str(cfg.hydra.sweep.dir)
    space = {k: str(v) for k, v in (sweeper.get("params") or {}).items()} | cli_space
    for key in fixed_keys & set(space):  # a fixed value on the command line wins, as in Hydra
        del space[key]
    _distributions(space)  # validate now, before any study or trial exists
    base = _base_values(
        config_name, source, cfg, file_overrides, cli_fixed, set(space) | fixed_keys
    )
    directions = _directions(sweeper, source)
    n_trials = int(sweeper.get("n_trials") or 0)
    n_jobs = int(sweeper.get("n_jobs") or 1)
    if n_trials < 1 or n_jobs < 1:
        raise PipelineError(f"{source}: hydra.sweeper.n_trials and n_jobs must be >= 1")
    study_name = str(sweeper.get("study_name") or "sweep")
    fingerprint = sweep_fingerprint(base, space, directions)
    # One folder per (study, config, code) next to the results: the database when no
    # storage is given, and one folder per trial (a persisted DVC output). A changed config,
    # search space or training code starts a new study; the same one (say, after a kill,
    # or with more n_trials) continues it.
    study_dir = Path(results_dir).resolve().parent / "study" / f"{study_name}-{fingerprint}"
    storage = str(sweeper.get("storage") or f"sqlite:///{study_dir / 'optuna.db'}")
    return SweepSettings(
        study_name=study_name,
        storage=storage,
        directions=directions,
        n_trials=n_trials,
        n_jobs=n_jobs,
        sampler={k: v for k, v in (sweeper.get("sampler") or {}).items() if v is not None},
        search_space=space,
        base=base,
        results_dir=str(Path(results_dir).resolve()),
        study_dir=str(study_dir),
        threads_per_worker=max(1, available_cpus() // n_jobs),
        shared_storage=not storage.startswith(("sqlite", "journal:")),
        fingerprint=fingerprint,
    )


def _split_overrides(cli_args: list[str]) -> tuple[dict[str, str], list[str], set[str]]:
    """The command line's sweeps (name -> search-space text), its fixed overrides and their keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(cli_args)
    except HydraException as exc:
        raise PipelineError(f"malformed override: {str(exc).splitlines()[0]}") from None
    space = {
        o.get_key_element(): o.input_line.split("=", 1)[1] for o in parsed if o.is_sweep_override()
    }
    fixed = [o for o in parsed if not o.is_sweep_override()]
    return space, [o.input_line for o in fixed], {o.get_key_element() for o in fixed}


def _compose(config_name: str, overrides: list[str], source: str, **kwargs: Any) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(conf_dir())):
            return compose(config_name, overrides=overrides, **kwargs)
    except (HydraException, OmegaConfBaseException) as exc:
        raise PipelineError(f"{source}: {str(exc).splitlines()[0]}") from None


def _base_values(
    config_name: str,
    source: str,
    cfg: Any,
    file_overrides: list[str],
    cli_fixed: list[str],
    cli_keys: set[str],
) -> dict[str, Any]:
    """Every trial's values: conf/ < params file (keys not searched) < command line."""
    from omegaconf import OmegaConf

    base_cfg = OmegaConf.to_container(cfg, resolve=False)
    base_cfg.pop("hydra", None)
    if file_overrides:
        kept = [o for o in file_overrides if o.split("=", 1)[0] not in cli_keys]
        layered = _compose(config_name, kept + cli_fixed, source)
        base_cfg = OmegaConf.to_container(layered, resolve=True)
    return dataclasses.asdict(to_schema(TrainConfig, base_cfg, source))


def _directions(sweeper: dict[str, Any], source: str) -> list[str]:
    directions = sweeper.get("direction") or ["minimize", "maximize"]
    directions = [directions] if isinstance(directions, str) else list(directions)
    bad = [d for d in directions if d not in ("minimize", "maximize")]
    if bad or len(directions) not in (1, 2):
        raise PipelineError(
            f"{source}: hydra.sweeper.direction must be minimize/maximize, one or two of them"
        )
    return directions
