"""Sweeps: what pruning saves to reach the same accuracy, and what a second worker buys.
Writes the "Sweeps" section of RESULTS.md (bench/sections.py).

    python -m bench sweep               # sample digits, 16 trials x 6 epochs, 2 rounds
    python -m bench sweep --smoke       # 4 trials x 2 epochs, 1 round: every row, no section

Rows, each sweep a fresh `python -u src/train_model.py --multirun` in its own folder, on the
same data and the same seeded search space (a learning rate over four decades, log-uniform,
and the batch size: wide enough that trials differ; the spread of the unpruned trials'
final val accuracy is reported so that can be checked), runs of both kinds alternated:
- without pruning and with `sweep_pruner=median`: total epochs trained, wall time, and wall
  time until the best val accuracy so far (complete trials) is within max(0.5 point, 2
  standard errors of a val accuracy) of the unpruned sweep's final best; the pruned
  sweep's epochs and time to that target over the unpruned sweep's (target: <= 0.6x each);
- 2 workers against 1 on one journal-file study (`hydra.sweeper.n_jobs`): wall time.
MLflow is off in these runs (the same for all): what is measured is the sweep. OpenMP
threads wait passively (OMP_WAIT_POLICY=PASSIVE) in every run: see bench/ddp.py.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.sections import write_section
from imgpipe.cpus import available_cpus
from imgpipe.data import export_sample_digits, process_dataset
from imgpipe.testing import REPO

TOPIC = "sweep"
TITLE = "Sweeps: pruning and workers"
SPACE = ["lr=tag(log,interval(0.0003,3.0))", "train_bs=choice(32,64)"]


def run_sweep(work: Path, data: Path, name: str, trials: int, epochs: int, *extra: str):
    """One sweep in ``work/name``; its study (a journal file) and its wall time."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    root = work / name
    journal = root / "study.journal"
    args = [
        "--multirun",
        f"data_dir_path={data}",
        f"epochs={epochs}",
        f"hydra.sweep.dir={root / 'results'}",
        f"hydra.sweeper.storage=journal:{journal}",
        f"hydra.sweeper.n_trials={trials}",
        "setup_mlflow=false",
        f"log_dir={root / 'logs'}",
        *SPACE,
        *extra,
    ]
    # Threads that wait sleep instead of spinning: on a shared machine a spinning OpenMP
    # team loses most of its time slices (bench/ddp.py), the same for every sweep here.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-u", str(REPO / "src" / "train_model.py"), *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"error: sweep {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return Sweep(list(study.trials)), wall  # read now: the folder goes away


class Sweep:
    """What one sweep's trials say (frozen trials, read before their folder is removed)."""

    def __init__(self, trials: list) -> None:
        self.trials = trials


def epochs_trained(study: Sweep) -> int:
    return sum(int(t.user_attrs.get("epochs_trained") or 0) for t in study.trials)


def final_accuracies(study: Sweep) -> list[float]:
    return [t.values[1] for t in study.trials if t.state.name == "COMPLETE"]


def seconds_to(study: Sweep, target: float) -> float:
    """From the sweep's first trial start until a complete trial reaches ``target``."""
    start = min(t.datetime_start for t in study.trials if t.datetime_start)
    done = sorted(
        (t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.datetime_complete
    )
    for t in done:
        if t.values[1] >= target:
            return (t.datetime_complete - start).total_seconds()
    return math.inf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs of each")
    parser.add_argument("--smoke", action="store_true", help="4 x 2 epochs, 1 round, no section")
    args = parser.parse_args(argv)
    trials, epochs, rounds = (4, 2, 1) if args.smoke else (args.trials, args.epochs, args.rounds)
    prune = ["sweep_pruner=median", "sweep_pruner_startup_trials=3"]
    prune.append("sweep_pruner_warmup_epochs=1")
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-sweep-") as tmp:
        work = Path(tmp)
        export_sample_digits(work / "raw")
        data = work / "processed"
        process_dataset(work / "raw", data)
        n_val = len(np.load(data / "val_labels.npy"))
        plain, pruned = [], []
        for i in range(rounds):  # alternated: a shared machine drifts between runs
            plain.append(run_sweep(work, data, f"plain-{i}", trials, epochs))
            pruned.append(run_sweep(work, data, f"pruned-{i}", trials, epochs, *prune))
        one = run_sweep(work, data, "workers-1", trials, epochs, "hydra.sweeper.n_jobs=1")
        two = run_sweep(work, data, "workers-2", trials, epochs, "hydra.sweeper.n_jobs=2")

    best = max(max(final_accuracies(s)) for s, _ in plain)
    se = math.sqrt(best * (1 - best) / n_val) if n_val else 0.0
    target = best - max(0.005, 2 * se)
    spread = statistics.pstdev([a for s, _ in plain for a in final_accuracies(s)])
    ep_plain = statistics.median(epochs_trained(s) for s, _ in plain)
    ep_pruned = statistics.median(epochs_trained(s) for s, _ in pruned)
    wall_plain = statistics.median(w for _, w in plain)
    wall_pruned = statistics.median(w for _, w in pruned)
    to_plain = statistics.median(seconds_to(s, target) for s, _ in plain)
    to_pruned = statistics.median(seconds_to(s, target) for s, _ in pruned)
    pruned_count = statistics.median(
        sum(t.state.name == "PRUNED" for t in s.trials) for s, _ in pruned
    )
    rows = [
        ("spread of final val accuracy (unpruned trials, SD)", f"{100 * spread:.1f} pt", "", ""),
        ("target: best val accuracy within", f"{100 * (best - target):.1f} pt", "", ""),
        ("epochs trained, no pruning", f"{ep_plain:.0f}", "", "measured"),
        ("epochs trained, median pruning", f"{ep_pruned:.0f} ({pruned_count:.0f} pruned)", "", ""),
        ("epochs, pruned / unpruned", f"{ep_pruned / ep_plain:.2f}x", "<= 0.6x", _ok(ep_pruned / ep_plain, 0.6)),
        ("wall time, no pruning", f"{wall_plain:.1f} s", "", "measured"),
        ("wall time, median pruning", f"{wall_pruned:.1f} s", "", "measured"),
        ("time to target, no pruning", f"{to_plain:.1f} s", "", "measured"),
        ("time to target, median pruning", f"{to_pruned:.1f} s", "", "measured"),
        ("time to target, pruned / unpruned", f"{to_pruned / to_plain:.2f}x", "<= 0.6x", _ok(to_pruned / to_plain, 0.6)),
        ("journal storage, 1 worker", f"{one[1]:.1f} s", "", "measured"),
        ("journal storage, 2 workers", f"{two[1]:.1f} s", "", "measured"),
        ("2 workers / 1 worker wall time", f"{two[1] / one[1]:.2f}x", "", "measured"),
    ]  # fmt: skip
    for row in rows:
        print(" | ".join(row))
    if not args.smoke:
        load = os.getloadavg()[0]
        intro = (
            f"Sample digits ({n_val} val images), {trials} trials x {epochs} epochs, space "
            f"{' '.join(SPACE)}, TPE seed 55, {available_cpus()} CPUs, median of {rounds} "
            f"alternated rounds, load average {load:.1f} at the end, MLflow off, "
            "OMP_WAIT_POLICY=PASSIVE."
        )
        data_out = {
            "plain_wall_s": [w for _, w in plain],
            "pruned_wall_s": [w for _, w in pruned],
            "plain_epochs": [epochs_trained(s) for s, _ in plain],
            "pruned_epochs": [epochs_trained(s) for s, _ in pruned],
            "target": target,
            "workers_wall_s": {"1": one[1], "2": two[1]},
            "load_average": load,
        }
        write_section(TOPIC, TITLE, intro, rows, data_out)
    return 0


def _ok(ratio: float, limit: float) -> str:
    return "met" if ratio <= limit else "missed"


if __name__ == "__main__":
    raise SystemExit(main())
