"""Sweeps that stop early and share cleanly: pruning (two objectives by the documented rule,
one through Optuna's own path), workers that never draw the same trial, the search space
from the command line, conditional parameters, and Optuna/Hydra through public APIs only."""

from __future__ import annotations

import ast
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import error_lines, start_sweep
from imgpipe.testing import REPO, empty_store, run_script

pytestmark = pytest.mark.slow


def sweep_args(root: Path, data: Path, *extra: str) -> list[str]:
    """A sweep whose every output lives under ``root``."""
    return [
        "--multirun",
        f"data_dir_path={data}",
        f"hydra.sweep.dir={root / 'sweep' / 'results'}",
        f"mlflow_tracking_uri=sqlite:///{empty_store(root / 'mlruns' / 'mlflow.db')}",
        f"log_dir={root / 'logs'}",
        *extra,
    ]


def study_of(root: Path, storage: str | None = None):
    import optuna

    if storage is None:
        (db,) = (root / "sweep" / "study").glob("*/optuna.db")
        storage = f"sqlite:///{db}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def trials_csv(root: Path) -> list[dict[str, str]]:
    with open(root / "sweep" / "results" / "trials.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# Learning rates ten thousand times too small barely move the seed CNN in 3 epochs: the
# median rule must stop them after epoch 2 once two trials are complete.
BAD_LRS = ["lr=choice(0.0001,1.0)", "epochs=3", "sweep_pruner=median"]
BAD_LRS += ["sweep_pruner_startup_trials=2", "sweep_pruner_warmup_epochs=1"]


def test_median_pruning_of_two_objectives_counts_pruned_trials_and_resumes_after_sigkill(
    few_processed: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    args = sweep_args(tmp_path, few_processed, *BAD_LRS, "hydra.sweeper.n_trials=8")
    proc = start_sweep(args, tmp_path)
    seen_fifth = False
    for line in proc.stderr:  # kill in the middle of the fifth trial
        seen_fifth = seen_fifth or "trial 4 (worker" in line
        if seen_fifth and "epoch 1/3" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(60)
    before = {t.number: t for t in study_of(tmp_path).trials}
    done_before = {n: t.state.name for n, t in before.items() if t.state.name != "RUNNING"}
    assert 4 in before and before[4].state.name == "RUNNING"

    again = run_script("train_model.py", *args, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr
    study = study_of(tmp_path)
    states = [t.state.name for t in study.trials]
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert pruned, states
    # Exactly n_trials counted: complete + pruned; the killed trial was retried once, the
    # trials finished before the kill were not run again.
    assert len(pruned) + len(complete) == 8, states
    assert states.count("FAIL") == 1  # the killed trial, retried (not counted)
    for n, state in done_before.items():
        assert study.trials[n].state.name == state
    for t in pruned:
        assert t.params["lr"] == 0.0001
        assert t.user_attrs["epochs_trained"] == t.user_attrs["pruned_at_epoch"] == 2
        assert len(t.user_attrs["val_loss_by_epoch"]) == 2
        assert len(t.user_attrs["val_accuracy_by_epoch"]) == 2
    assert all(t.user_attrs["epochs_trained"] == 3 for t in complete)

    # Never in the Pareto front, the best trial or the results' solutions.
    pruned_numbers = {t.number for t in pruned}
    assert not pruned_numbers & {t.number for t in study.best_trials}
    results = tmp_path / "sweep" / "results"
    best = yaml.safe_load((results / "best_params.yaml").read_text())
    assert best["trial"] not in pruned_numbers
    solutions = yaml.safe_load((results / "optimization_results.yaml").read_text())["solutions"]
    assert all(s["params"]["lr"] == 1.0 for s in solutions)
    rows = {int(r["number"]): r for r in trials_csv(tmp_path)}
    assert {n for n, r in rows.items() if r["state"] == "PRUNED"} == pruned_numbers
    assert all(rows[n]["epochs_trained"] == "2" for n in pruned_numbers)

    # MLflow: each pruned trial's run ended KILLED with the tag; two epochs logged.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    for t in pruned:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED"
        assert run.data.tags["pruned"] == "true"
        assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2


def test_one_objective_prunes_through_optunas_report_and_should_prune(
    few_processed: Path, tmp_path: Path
) -> None:
    args = sweep_args(
        tmp_path,
        few_processed,
        *BAD_LRS,
        "hydra.sweeper.direction=[minimize]",
        "hydra.sweeper.n_trials=6",
        "setup_mlflow=false",
    )
    result = run_script("train_model.py", *args, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    study = study_of(tmp_path)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, [t.state.name for t in study.trials]
    for t in pruned:  # Trial.report's values: Optuna's MedianPruner decided
        assert sorted(t.intermediate_values) == [1, 2]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(pruned) + len(complete) == 6
    assert study.best_trial.number not in {t.number for t in pruned}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            ["sweep_pruner=hyperband"], "sweep_pruner=hyperband", id="hyperband-two-objectives"
        ),
        pytest.param(["sweep_pruner=sometimes"], "'sweep_pruner'", id="unknown-pruner"),
        pytest.param(
            ["sweep_pruner=percentile", "sweep_pruner_percentile=150"],
            "sweep_pruner_percentile",
            id="percentile-out-of-range",
        ),
        pytest.param(
            ["sweep_pruner=median", "sweep_pruner_objective=val/f1"],
            "'sweep_pruner_objective'",
            id="unknown-objective",
        ),
        pytest.param(
            [
                "sweep_pruner=median",
                "sweep_pruner_objective=val/accuracy",
                "hydra.sweeper.direction=[minimize]",
            ],
            "'sweep_pruner_objective'",
            id="objective-not-in-a-one-objective-study",
        ),
    ],
)
def test_a_refused_pruner_is_one_line(tmp_path: Path, overrides: list[str], expected: str) -> None:
    result = run_script(
        "train_model.py", *sweep_args(tmp_path, tmp_path / "nodata", *overrides), cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert expected in line, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep" / "study").exists()


@pytest.mark.parametrize(
    ("judged", "direction", "start", "steps"),
    [("val/loss", "minimize", 2.0, (-0.3, 0.1)), ("val/accuracy", "maximize", 0.3, (-0.05, 0.1))],
)
def test_the_two_objective_rule_prunes_where_optunas_median_pruner_does(
    judged: str, direction: str, start: float, steps: tuple[float, float]
) -> None:
    """The same curves judged twice: by Optuna's MedianPruner in a one-objective study of
    that direction, and by the project's rule in a two-objective one, on the objective
    ``sweep_pruner_objective`` names (reference: complete trials only; a trial's best so far
    against their value at the epoch; warm-up; start-up trials)."""
    import numpy as np
    import optuna
    from optuna.trial import TrialState

    from imgpipe.sweep.pruning import EpochJudge, Pruned, PrunerSettings, curve_attr, optuna_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    epochs, rng = 6, np.random.default_rng(3)
    curves = [list(np.cumsum(rng.uniform(*steps, epochs)) + start) for _ in range(30)]
    other = "val/accuracy" if judged == "val/loss" else "val/loss"
    settings = PrunerSettings("median", startup_trials=3, warmup_epochs=1, objective=judged)
    one = optuna.create_study(direction=direction, pruner=optuna_pruner(settings, epochs))
    two = optuna.create_study(directions=["minimize", "maximize"])
    by_optuna, by_rule = [], []
    for curve in curves:
        trial, stopped = one.ask(), epochs
        for epoch, value in enumerate(curve, 1):
            trial.report(value, epoch)
            if epoch < epochs and trial.should_prune():
                stopped = epoch
                break
        one.tell(
            trial,
            None if stopped < epochs else curve[-1],
            state=None if stopped == epochs else TrialState.PRUNED,
        )
        by_optuna.append(stopped)

        trial, stopped = two.ask(), epochs
        judge = EpochJudge(trial, two, settings, ["minimize", "maximize"], epochs)
        try:
            for epoch, value in enumerate(curve, 1):
                # The other objective moves the opposite way: only the judged one counts.
                judge(epoch, {judged: value, other: -value}, None)
        except Pruned as exc:
            stopped = exc.epoch
        assert trial.user_attrs[curve_attr(judged)] == curve[:stopped]
        assert trial.user_attrs[curve_attr(other)] == [-v for v in curve[:stopped]]
        if stopped < epochs:
            two.tell(trial, state=TrialState.PRUNED)
        else:
            two.tell(trial, [curve[-1], 0.5])
        by_rule.append(stopped)
    assert by_rule == by_optuna
    assert epochs in by_rule and min(by_rule) == 2  # some run to the end, some stop early


def test_the_pruner_is_a_param_of_the_sweep_stage_but_keeps_the_study() -> None:
    """Turning pruning on for a study that ran without it continues that study (its complete
    trials are what they were), while DVC reruns the sweep stage (its result changes)."""
    from dataclasses import asdict

    from imgpipe.config import TrainConfig
    from imgpipe.sweep.settings import sweep_fingerprint

    base = asdict(TrainConfig())
    space, directions = {"lr": "interval(0.5,2.0)"}, ["minimize", "maximize"]
    pruned = base | {"sweep_pruner": "median", "sweep_pruner_startup_trials": 5}
    before = sweep_fingerprint(base, space, directions)
    assert sweep_fingerprint(pruned, space, directions) == before
    assert sweep_fingerprint(base | {"gamma": 0.5}, space, directions) != before
    params = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sweep"]["params"]
    assert {"sweep_pruner", "sweep_pruner_startup_trials"} <= set(params)


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_processes_on_one_study_draw_distinct_params_and_end_with_n_trials(
    few_processed: Path, tmp_path: Path, storage: str
) -> None:
    """Two `--multirun` commands with the same seed on one study: no identical params, no
    trial run twice, exactly n_trials in the end."""
    where = (
        f"hydra.sweeper.storage=journal:{tmp_path / 'study.journal'}"
        if storage == "journal"
        else f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}"
    )
    procs = []
    for i in range(2):
        root = tmp_path / f"proc-{i}"
        root.mkdir()
        args = sweep_args(
            root,
            few_processed,
            where,
            "epochs=1",
            "lr=interval(0.5,2.0)",
            "hydra.sweeper.n_trials=4",
            "setup_mlflow=false",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-u", str(REPO / "src" / "train_model.py"), *args],
                cwd=root,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err
    url = where.split("=", 1)[1]
    if storage == "journal":
        import optuna
        from optuna.storages.journal import JournalFileBackend

        url = optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    study = study_of(tmp_path, url)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    assert len({t.params["lr"] for t in complete}) == 4
    assert len({t.user_attrs["pid"] for t in complete}) == 2, "both processes worked"


@pytest.mark.parametrize(
    "given",
    [
        pytest.param("lr=range(0.05,2.0,step=0.05)", id="key"),
        pytest.param("hydra.sweeper.params.lr=range(0.05,2.0,step=0.05)", id="sweeper-key"),
        pytest.param("hydra.sweeper.params.lr='range(0.05,2.0,step=0.05)'", id="sweeper-quoted"),
    ],
)
def test_the_search_space_from_the_command_line_both_ways(given: str) -> None:
    from optuna.distributions import FloatDistribution

    from imgpipe.sweep.settings import load_settings, search_distributions

    settings = load_settings("train_model", [given])
    assert settings.search_space["lr"] == "range(0.05,2.0,step=0.05)"
    dist = search_distributions(settings.search_space)["lr"]
    assert isinstance(dist, FloatDistribution) and dist.step == 0.05 and dist.low == 0.05


def test_conditional_params_are_drawn_only_where_they_apply() -> None:
    import optuna

    from imgpipe.sweep.settings import load_settings, search_distributions
    from imgpipe.sweep.trial import draw_params

    settings = load_settings(
        "train_model",
        ["momentum=interval(0.5,0.95)", "optimizer=choice(adadelta,sgd,adamw)"],
    )
    space = search_distributions(settings.search_space)
    assert next(iter(space)) == "optimizer"  # the condition is drawn first
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(12):
        trial = study.ask()
        drawn.append(draw_params(trial, space, settings.base))
        study.tell(trial, 0.0)
    assert {p["optimizer"] for p in drawn} == {"adadelta", "sgd", "adamw"}
    for params in drawn:
        assert ("momentum" in params) == (params["optimizer"] == "sgd"), params


def test_the_sweep_uses_no_private_optuna_or_hydra_api() -> None:
    """Attribute access with a leading underscore on anything but self/cls, and imports of
    private modules (``_impl``, ``optuna._...``): the next release may break them silently."""
    offenders = []
    for path in [
        *sorted((REPO / "src" / "imgpipe" / "sweep").glob("*.py")),
        REPO / "src" / "imgpipe" / "dashboard.py",
    ]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] in ("optuna", "hydra", "hydra_plugins") and any(
                    p.startswith("_") for p in parts
                ):
                    offenders.append(f"{path.name}:{node.lineno} from {node.module}")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] in ("optuna", "hydra", "hydra_plugins") and any(
                        p.startswith("_") for p in parts
                    ):
                        offenders.append(f"{path.name}:{node.lineno} import {alias.name}")
    assert not offenders, offenders


def test_the_sweeps_settings_load_without_torch() -> None:
    """`make dashboard` reads the sweep's settings (its study, storage and objectives): the
    objective names it shares with training must not pull in torch (1.5 s here)."""
    probe = (
        "import sys, imgpipe.sweep.settings; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
