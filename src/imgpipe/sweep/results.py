"""What a finished study leaves: the best trial, trials.csv, the Pareto plot, the results folder."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from imgpipe.atomic import atomic_dir
from imgpipe.errors import PipelineError
from imgpipe.metrics import OBJECTIVE_NAMES
from imgpipe.sweep.pruning import EPOCHS_ATTR
from imgpipe.sweep.settings import TEST_NAMES, SweepSettings

# The results folder, in the order write_results writes it.
RESULT_FILES = ("optimization_results.yaml", "best_params.yaml", "trials.csv", "pareto_front.png")


def best_trial(study, directions: list[str]):
    """The documented rule: among the Pareto-optimal trials, the best on the first
    objective (val loss by default), ties broken by the second (val accuracy)."""
    sign = [1 if d == "minimize" else -1 for d in directions]
    front = study.best_trials
    if not front:
        return None
    return min(front, key=lambda t: tuple(s * v for s, v in zip(sign, t.values, strict=False)))


def completed_ms(study: Any, best: dict[str, Any] | None) -> int:
    """When the best trial completed, in ms since the epoch: the same on every machine of
    one time zone (Optuna stores the writer's naive local time; read as local here, so the
    parent run shows the right time; machines in other zones add their own point)."""
    if best is None:
        return 0
    for t in study.get_trials(deepcopy=False):
        if t.number == best["trial"] and t.datetime_complete is not None:
            return int(t.datetime_complete.timestamp() * 1000)
    return 0


def trials_table(study) -> tuple[list[str], list[list[Any]]]:
    """One row per trial (PRUNED ones too, with the epochs they trained); surplus trials,
    opened by a worker after the study was full and never trained, are left out."""
    names = list(study.metric_names or OBJECTIVE_NAMES)
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    param_names = sorted({p for t in trials for p in t.params})
    header = [
        "number",
        "state",
        *(f"params_{p}" for p in param_names),
        *(f"values_{n.replace('/', '_')}" for n in names),
        *(n.replace("/", "_") for n in TEST_NAMES),
        "duration_s",
        EPOCHS_ATTR,
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
                *(t.user_attrs.get(n) for n in TEST_NAMES),
                t.user_attrs.get("duration_s"),
                t.user_attrs.get(EPOCHS_ATTR),
                t.user_attrs.get("mlflow_run_id", ""),
                t.user_attrs.get("failure", ""),
            ]
        )
    return header, rows


# --------------------------------------------------------------------------- the plot


def plot_front(study, directions: list[str], path: Path) -> None:
    """The Pareto front as a PNG (matplotlib's Agg backend: no display, no network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    names = list(study.metric_names or OBJECTIVE_NAMES)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    if len(directions) == 2:
        _plot_two_objectives(ax, done, {t.number for t in study.best_trials}, names, directions)
    else:
        ax.plot([t.number for t in done], [t.values[0] for t in done], "o-", c="#3b6ea5")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{names[0]} ({directions[0]})")
    ax.set_title(f"study {study.study_name}: {len(done)} complete trials")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_two_objectives(
    ax: Any, done: list[Any], best: set[int], names: list[str], directions: list[str]
) -> None:
    """Every complete trial, the Pareto front in red, each point labelled with its number."""
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


# --------------------------------------------------------------------------- the folder


def write_results(study, settings: SweepSettings) -> dict[str, Any]:
    """Write the results folder atomically; return the best trial's summary."""
    import yaml

    best = best_trial(study, settings.directions)
    if best is None:
        raise PipelineError(
            f"all trials of study {settings.study_name!r} failed; see the 'failure' column "
            f"with `optuna trials` or the logs in {settings.base['log_dir']}"
        )
    names = list(study.metric_names or OBJECTIVE_NAMES)
    best_doc = {
        "rule": "Pareto-optimal trial with the best first objective, ties broken by the second",
        "trial": best.number,
        "params": best.params,
        "values": dict(zip(names, best.values, strict=False)),
        # measured once at the trial's end, not looked at by the choice above
        "test": {n: best.user_attrs[n] for n in TEST_NAMES if n in best.user_attrs},
        "mlflow_run_id": best.user_attrs.get("mlflow_run_id", ""),
    }
    with atomic_dir(settings.results_dir) as tmp:
        optimization, best_params, trials, front = (tmp / name for name in RESULT_FILES)
        optimization.write_text(
            yaml.safe_dump(_optimization_doc(study, best, settings.directions), sort_keys=False)
        )
        best_params.write_text(yaml.safe_dump(best_doc, sort_keys=False))
        header, rows = trials_table(study)
        with open(trials, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        plot_front(study, settings.directions, front)
    return best_doc


def _optimization_doc(study, best, directions: list[str]) -> dict[str, Any]:
    """``optimization_results.yaml`` as Hydra's Optuna sweeper writes it."""
    if len(directions) == 1:
        return {"name": "optuna", "best_params": best.params, "best_value": best.values[0]}
    return {
        "name": "optuna",
        "solutions": [{"params": t.params, "values": list(t.values)} for t in study.best_trials],
    }


def result_paths(settings: SweepSettings) -> list[Path]:
    """The files of the results folder, to attach to the parent run."""
    return [Path(settings.results_dir) / name for name in RESULT_FILES]
