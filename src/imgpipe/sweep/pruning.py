"""Pruning: stopping a trial after an epoch when it looks worse than the trials before it.

``sweep_pruner`` (a top-level key beside the ``hydra.sweeper`` block) picks the rule:

- ``none`` (the default): every trial trains all its epochs.
- ``median`` / ``percentile``: after epoch e (e > ``sweep_pruner_warmup_epochs``, once
  ``sweep_pruner_startup_trials`` trials are COMPLETE), a trial whose best value so far of
  the judged objective is worse than the median (``percentile``: the
  ``sweep_pruner_percentile``-th percentile, as Optuna's ``PercentilePruner`` counts it) of
  the complete trials' value at epoch e is pruned.
- ``hyperband``: Optuna's Hyperband over epochs (one objective only).

The judged objective is ``sweep_pruner_objective``: the study's first (val loss) unless it
names another (``val/accuracy``, judged in its own direction). One objective: Optuna's own
pruner, through ``Trial.report`` / ``Trial.should_prune`` (intermediate values survive a
retry: the retry callback inherits them). Two objectives: Optuna's ``report`` refuses
multi-objective studies, so the rule above is applied here, to the per-epoch values every
trial keeps in its user attributes (``val_loss_by_epoch``, ``val_accuracy_by_epoch``: lists,
copied to a retried trial with the other user attributes, so a resumed trial is judged on
its whole history). Hyperband keeps its own brackets on the trial and cannot follow that
rule: it is refused with one line.

A pruned trial is PRUNED in the study and counts toward ``n_trials``; it never enters
the Pareto front or the champion (those look at COMPLETE trials only); its MLflow run
ends KILLED with the tag ``pruned=true``, and trials.csv says PRUNED with its
``epochs_trained``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imgpipe.errors import PipelineError
from imgpipe.metrics import OBJECTIVE_NAMES
from imgpipe.sweep.resilience import note, retrying

PRUNERS = ("none", "median", "percentile", "hyperband")
SINGLE_OBJECTIVE_ONLY = ("hyperband",)
EPOCHS_ATTR = "epochs_trained"
PRUNED_ATTR = "pruned_at_epoch"


@dataclass(frozen=True)
class PrunerSettings:
    name: str = "none"
    startup_trials: int = 3
    warmup_epochs: int = 1
    percentile: float = 50.0
    objective: str = OBJECTIVE_NAMES[0]

    @property
    def active(self) -> bool:
        return self.name != "none"


def curve_attr(objective: str) -> str:
    """The user attribute holding a trial's per-epoch values of ``objective``."""
    return objective.replace("/", "_") + "_by_epoch"


def pruner_settings(base: Mapping[str, Any], directions: list[str]) -> PrunerSettings:
    """The pruner keys of the config, checked against the study's objectives (one line each)."""
    found = PrunerSettings(
        name=str(base.get("sweep_pruner") or "none"),
        startup_trials=int(base.get("sweep_pruner_startup_trials", 3)),
        warmup_epochs=int(base.get("sweep_pruner_warmup_epochs", 1)),
        percentile=float(base.get("sweep_pruner_percentile", 50.0)),
        objective=str(base.get("sweep_pruner_objective") or OBJECTIVE_NAMES[0]),
    )
    judged = OBJECTIVE_NAMES[: len(directions)]
    if found.objective not in judged:
        raise PipelineError(
            f"config key 'sweep_pruner_objective': {found.objective!r} is not an objective "
            f"of this study ({', '.join(judged)})"
        )
    if found.name not in PRUNERS:
        raise PipelineError(
            f"config key 'sweep_pruner': {found.name!r} is not one of {', '.join(PRUNERS)}"
        )
    if found.name in SINGLE_OBJECTIVE_ONLY and len(directions) > 1:
        raise PipelineError(
            f"sweep_pruner={found.name} keeps its own state per trial and cannot prune a "
            f"study with {len(directions)} objectives; use median or percentile (the rule "
            "on one objective), or hydra.sweeper.direction with one objective"
        )
    if not 0 <= found.percentile <= 100:
        raise PipelineError(
            f"config key 'sweep_pruner_percentile': {found.percentile} must be in [0, 100]"
        )
    if found.startup_trials < 0 or found.warmup_epochs < 0:
        raise PipelineError(
            "config keys 'sweep_pruner_startup_trials' and 'sweep_pruner_warmup_epochs' "
            "must be >= 0"
        )
    return found


def optuna_pruner(settings: PrunerSettings, epochs: int) -> Any:
    """Optuna's pruner for a single-objective study (steps are epochs, 1-based)."""
    import optuna

    # Optuna skips steps < n_warmup_steps; ours says "prunable after the warm-up epochs".
    warmup = settings.warmup_epochs + 1
    if settings.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials, n_warmup_steps=warmup
        )
    if settings.name == "percentile":
        return optuna.pruners.PercentilePruner(
            settings.percentile, n_startup_trials=settings.startup_trials, n_warmup_steps=warmup
        )
    if settings.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, warmup), max_resource=max(epochs, warmup + 1)
        )
    return optuna.pruners.NopPruner()


class Pruned(Exception):
    """Raised by the epoch hook to stop the trial's training after ``epoch``."""

    def __init__(self, epoch: int, run_id: str | None) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch
        self.run_id = run_id


def percentile_rule(
    best_so_far: float, others: list[float], direction: str, percentile: float
) -> bool:
    """True when ``best_so_far`` is worse than the percentile of ``others`` (Optuna's
    PercentilePruner arithmetic: the kept share is the top ``percentile`` per cent)."""
    import numpy as np

    q = 100 - percentile if direction == "maximize" else percentile
    cut = float(np.nanpercentile(np.array(others, dtype=float), q))
    return best_so_far < cut if direction == "maximize" else best_so_far > cut


class EpochJudge:
    """The hook ``train`` calls after every epoch of a trial: records the epoch on the trial
    (``epochs_trained``, each objective's curve) and raises ``Pruned`` when the rule says
    so. The last epoch is never pruned: the trial is complete by then."""

    def __init__(
        self,
        trial: Any,
        study: Any,
        settings: PrunerSettings,
        directions: list[str],
        epochs: int,
    ) -> None:
        self.trial = trial
        self.study = study
        self.settings = settings
        self.epochs = epochs
        self.judged = settings.objective
        self.direction = directions[OBJECTIVE_NAMES.index(self.judged)]
        self.curves: dict[str, list[float | None]] = {
            name: list(trial.user_attrs.get(curve_attr(name)) or [])
            for name in OBJECTIVE_NAMES[: len(directions)]
        }
        self.single = len(directions) == 1

    def __call__(self, epoch: int, metrics: Mapping[str, float], run_id: str | None) -> None:
        for name, curve in self.curves.items():
            curve += [None] * (epoch - len(curve))
            curve[epoch - 1] = float(metrics[name])
            note(self.trial, curve_attr(name), curve)
        note(self.trial, EPOCHS_ATTR, epoch)
        if not self.settings.active or epoch >= self.epochs:
            return
        if self.single:
            value = self.curves[self.judged][epoch - 1]
            retrying(lambda: self.trial.report(value, epoch), what="reporting an epoch")
            prune = retrying(self.trial.should_prune, what="asking the pruner")
        else:
            prune = self._percentile_rule(epoch)
        if prune:
            note(self.trial, PRUNED_ATTR, epoch)
            raise Pruned(epoch, run_id)

    def _percentile_rule(self, epoch: int) -> bool:
        from optuna.trial import TrialState

        if epoch <= self.settings.warmup_epochs:
            return False  # before reading the storage: nothing to judge yet
        complete = retrying(
            lambda: self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
            what="reading complete trials",
        )
        attr = curve_attr(self.judged)
        curves = [t.user_attrs.get(attr) or [] for t in complete]
        return prunes_after(epoch, self.curves[self.judged], curves, self.settings, self.direction)


def prunes_after(
    epoch: int,
    mine: list[float | None],
    complete: list[list[float | None]],
    settings: PrunerSettings,
    direction: str,
) -> bool:
    """The two-objective rule, pure: True when the trial whose judged values so far are
    ``mine`` is pruned after ``epoch``, given the judged curves of the ``complete`` trials
    (bench/sweep.py replays recorded sweeps through it)."""
    import numpy as np

    if epoch <= settings.warmup_epochs or len(complete) < max(1, settings.startup_trials):
        return False
    others = [c[epoch - 1] for c in complete if len(c) >= epoch and c[epoch - 1] is not None]
    if not others:
        return False
    # The trial's best so far, NaN only when every epoch was: then it is pruned, as
    # Optuna's PercentilePruner does (np.nanmax/nanmin, its own arithmetic).
    values = np.array([v for v in mine[:epoch] if v is not None], dtype=float)
    if np.isnan(values).all():
        return True
    best = float(np.nanmax(values) if direction == "maximize" else np.nanmin(values))
    share = 50.0 if settings.name == "median" else settings.percentile
    return percentile_rule(best, others, direction, share)
