"""What a sweep runs: its settings, the search space, and the study's fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe.compose import compose_stage
from imgpipe.config import TrainConfig, result_keys, to_schema
from imgpipe.cpus import available_cpus
from imgpipe.errors import PipelineError
from imgpipe.metrics import TEST_METRIC_NAMES
from imgpipe.sweep.pruning import PrunerSettings, pruner_settings

# A trial returns its OBJECTIVE_NAMES (validation). Test is measured once per trial and
# only reported (user attrs, the parent run), so the chosen trial's test score is unbiased.
TEST_NAMES = TEST_METRIC_NAMES
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/imgpipe

# The keys that change what a trial computes; paths and tracking settings do not,
# so workers on several machines with their own paths still join one study.
# The pruner's keys (``config.SWEEP``: ``result_keys("sweep")``) change which trials train
# all their epochs, so the sweep's result and its DVC params, but not what any epoch of a
# trial computes: they stay out. A study continued with another pruner keeps its trials
# (Optuna lets a study change its pruner between runs); a complete trial is the same.
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
    pruner: PrunerSettings = field(default_factory=PrunerSettings)


# --------------------------------------------------------------------------- search space


# Conditional parameters: a key that only means something for some values of another is
# drawn only in trials that take one of those values (else the trial keeps its fixed value
# and the key is not among the trial's params), so the sampler does not learn from noise.
CONDITIONS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "momentum": ("optimizer", ("sgd",)),
    "nesterov": ("optimizer", ("sgd",)),
    "gamma": ("scheduler", ("step",)),
    "warmup_epochs": ("scheduler", ("cosine",)),
}


def applies(name: str, drawn: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether search-space key ``name`` applies, given the values drawn so far and the fixed ones."""
    if name not in CONDITIONS:
        return True
    parent, values = CONDITIONS[name]
    return drawn.get(parent, base.get(parent, values[0])) in values


def search_distributions(search_space: dict[str, str]) -> dict[str, Any]:
    """The search space as Optuna distributions, a conditioning key before the keys it
    conditions (``CONDITIONS``)."""
    dists = _distributions(search_space)
    parents = {CONDITIONS[n][0] for n in dists if n in CONDITIONS}
    return dict(sorted(dists.items(), key=lambda item: item[0] not in parents))


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
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    try:
        (override,) = parser.parse_overrides([f"{name}={text}"])
        dist = distribution_of(override)
    except (HydraException, ValueError, AssertionError, NotImplementedError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"{where}: malformed search space {text!r} ({message})") from None
    if dist is None:
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


def distribution_of(override: Any) -> Any:
    """A parsed sweep override as an Optuna distribution, by the rules of Hydra's Optuna
    sweeper (written out here from Hydra's public override types: the plugin's converter
    is not public). None for a single value."""
    from hydra.core.override_parser.types import (
        ChoiceSweep,
        IntervalSweep,
        RangeSweep,
        Transformer,
    )
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(
            list(override.sweep_iterator(transformer=Transformer.encode))
        )
    if isinstance(value, RangeSweep):
        if value.start is None or value.stop is None:
            raise ValueError("range needs a start and a stop")
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if isinstance(value, IntervalSweep):
        if value.start is None or value.end is None:
            raise ValueError("interval needs a start and an end")
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(int(value.start), int(value.end), log=log)
        return FloatDistribution(value.start, value.end, log=log)
    if override.is_sweep_override():
        raise NotImplementedError(f"{override.input_line} is not supported by the Optuna sweep")
    return None


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
    config_name: str, cli_args: Sequence[str], legacy_cli_args: Sequence[str] | None = None
) -> SweepSettings:
    """Compose the stage's config once (``imgpipe.compose.compose_stage``: conf/ < the params
    file < the command line, checked against the schema), split the command line into the
    search space and fixed values. (Callers of the old form ``(name, file_overrides,
    cli_args)`` still work: the loader reads the params file itself now.)"""
    from omegaconf import OmegaConf

    if legacy_cli_args is not None:
        cli_args = legacy_cli_args
    source = f"conf/{config_name}.yaml"
    cli_space, cli_fixed, fixed_keys = _split_overrides(list(cli_args))
    cfg = compose_stage(config_name, cli_fixed, return_hydra_config=True)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    results_dir = str(cfg.hydra.sweep.dir)
    space = {k: str(v) for k, v in (sweeper.get("params") or {}).items()} | cli_space
    for key in fixed_keys & set(space):  # a fixed value on the command line wins, as in Hydra
        del space[key]
    _distributions(space)  # validate now, before any study or trial exists
    values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra", None)
    base = dataclasses.asdict(to_schema(TrainConfig, OmegaConf.create(values), source))
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
        pruner=pruner_settings(base, directions),
    )


SPACE_PREFIX = "hydra.sweeper.params."


def _split_overrides(cli_args: list[str]) -> tuple[dict[str, str], list[str], set[str]]:
    """The command line's search space (name -> search-space text), its fixed overrides and
    their keys. A space is given as Hydra accepts it: ``lr=range(...)`` or
    ``hydra.sweeper.params.lr=range(...)`` (quoted or not)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(cli_args)
    except HydraException as exc:
        raise PipelineError(f"malformed override: {str(exc).splitlines()[0]}") from None
    space: dict[str, str] = {}
    fixed = []
    for o in parsed:
        key = o.get_key_element()
        text = o.input_line.split("=", 1)[1]
        if key.startswith(SPACE_PREFIX):
            value = o.value()
            space[key.removeprefix(SPACE_PREFIX)] = value if isinstance(value, str) else text
        elif o.is_sweep_override():
            space[key] = text
        else:
            fixed.append(o)
    return space, [o.input_line for o in fixed], {o.get_key_element() for o in fixed}


def _directions(sweeper: dict[str, Any], source: str) -> list[str]:
    directions = sweeper.get("direction") or ["minimize", "maximize"]
    directions = [directions] if isinstance(directions, str) else list(directions)
    bad = [d for d in directions if d not in ("minimize", "maximize")]
    if bad or len(directions) not in (1, 2):
        raise PipelineError(
            f"{source}: hydra.sweeper.direction must be minimize/maximize, one or two of them"
        )
    return directions
