"""Sweeps: what pruning saves to reach the same accuracy, and what a second worker buys.
Writes the "Sweeps" section of RESULTS.md (bench/sections.py).

    python -m bench sweep               # photos, timm test_efficientnet, 20 trials x 8 epochs
    python -m bench sweep --smoke       # 4 trials x 2 epochs, 1 round: every row, to smoke.md
    python -m bench sweep --space wide  # the same over docs/sweeps.md's multi-key space
    python -m bench sweep --replay      # redo the replay rows from bench/results/sweep.json
    (--out DIR: RESULTS.md and results/ in DIR instead of bench/)

The setting is the one the issue is about: trials whose epochs dominate their cost. Photo-like
RGB JPEGs (bench/photos.py: digits over tinted, noisy backgrounds) processed to 32x32, a timm
model (``test_efficientnet``: about 1 s an epoch on 2 cores, against about 0.1 s of fixed cost
a trial once the worker has started), AdamW, and a learning rate over seven decades of which
only a minority trains well in 8 epochs (the spread of the unpruned trials' final val accuracy
is reported so that can be checked). Each round has its own sampler seed (55, 56, ...) and runs
the sweep without pruning and with ``sweep_pruner=median sweep_pruner_objective=val/accuracy``
(the project's defaults otherwise: 3 complete trials first, 1 warm-up epoch) one after the other, each a fresh
``python -u src/train_model.py --multirun`` in its own folder, on the same data. Rows:
- total epochs trained, wall time, CPU time, and the wall time (from the first trial's
  start) and epochs (of every trial ended by then) until a complete trial's val accuracy is
  within max(0.5 point, 2 standard errors of a val accuracy) of the same round's unpruned
  final best; the ratios pruned / unpruned are per round, and the rows give their median
  (target: <= 0.6x in time and in epochs). On a shared machine wall time follows the load;
  epochs do not (a seeded sweep with one worker trains the same trials every time), and
  epochs are what a trial costs here;
- 2 workers against 1 on one journal-file study (``hydra.sweeper.n_jobs``): the first round's
  unpruned sweep is the 1-worker run, and the 2-worker run follows it with the same seed.
MLflow is off in these runs (the same for all): what is measured is the sweep. OpenMP
threads wait passively (OMP_WAIT_POLICY=PASSIVE) in every run: see bench/ddp.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.photos import generate_photos
from bench.sections import BENCH, write_section
from imgpipe.cpus import available_cpus
from imgpipe.data import process_dataset
from imgpipe.sweep.pruning import PrunerSettings, prunes_after
from imgpipe.testing import REPO

TOPIC = "sweep"
TITLE = "Sweeps: pruning and workers"
MODEL = "test_efficientnet"
SPACE = ["lr=tag(log,interval(1e-6,10.0))", "train_bs=choice(32,64)"]
FIXED = [f"model={MODEL}", "optimizer=adamw", "scheduler=none"]
# ``--space wide``: the learning rate and batch size as above, searched jointly with the
# keys of docs/sweeps.md's conditional example, over its ranges (momentum only with sgd).
# A learning rate's good decade depends on the optimizer, so good settings are rarer: the
# space a sweep over several keys meets, where pruning's saving before the first good
# trial is larger. Its rows go to a section of their own beside the lr-only one.
WIDE = [
    *SPACE,
    "optimizer=choice(adadelta,sgd,adamw)",
    "momentum=interval(0.5,0.95)",
    "weight_decay=tag(log,interval(1e-6,1e-2))",
]
WIDE_FIXED = [f"model={MODEL}", "scheduler=none"]
# The project's defaults for the rule's settings, judged on val accuracy: a batch-norm
# network at a good learning rate starts with a val loss above chance's (docs/sweeps.md).
PRUNE = ["sweep_pruner=median", "sweep_pruner_objective=val/accuracy"]
SEED = 55


def make_data(work: Path, images: int) -> Path:
    """``images`` photo-like JPEGs (96x72) processed to 32x32 RGB, 15 % of train as val."""
    generate_photos(work / "raw", images, (96, 72), available_cpus())
    out = work / "processed"
    process_dataset(work / "raw", out, val_fraction=0.15, image_size=(32, 32), image_mode="RGB")
    return out


def run_sweep(
    work: Path, data: Path, name: str, trials: int, epochs: int, space: list[str], *extra: str
):
    """One sweep in ``work/name``: its trials (read before the folder goes) and times."""
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
        *space,
        *extra,
    ]
    # Threads that wait sleep instead of spinning: on a shared machine a spinning OpenMP
    # team loses most of its time slices (bench/ddp.py), the same for every sweep here.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cpu_before = _children_cpu_s()
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
    cpu = _children_cpu_s() - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"error: sweep {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    print(f"{name}: {wall:.1f} s, {cpu:.1f} CPU s", file=sys.stderr, flush=True)
    return Sweep(list(study.trials), wall, cpu)


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's ended children: a sweep and its
    workers. A busy machine stretches wall time; it stretches CPU time far less."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


class Sweep:
    """One sweep's frozen trials, its wall time and its processes' CPU seconds."""

    def __init__(self, trials: list, wall: float, cpu: float) -> None:
        self.trials, self.wall, self.cpu = trials, wall, cpu

    @property
    def epochs(self) -> int:
        return sum(int(t.user_attrs.get("epochs_trained") or 0) for t in self.trials)

    @property
    def pruned(self) -> int:
        return sum(t.state.name == "PRUNED" for t in self.trials)

    def accuracies(self) -> list[float]:
        """The final val accuracy of every complete trial."""
        return [t.values[1] for t in self.trials if t.state.name == "COMPLETE"]

    def target(self, n_val: int) -> float:
        return val_target(self.accuracies(), n_val)

    def random_curves(self) -> list[list[float]]:
        """The val-accuracy curves of the complete trials TPE drew at random (its first)."""
        return [
            t.user_attrs["val_accuracy_by_epoch"]
            for t in self.trials
            if t.state.name == "COMPLETE" and t.number < RANDOM_TRIALS
        ]

    def reached(self, target: float) -> tuple[float, float]:
        """Seconds from the first trial's start until a complete trial reaches ``target``,
        and the epochs of every trial ended by then (both inf if never)."""
        start = min(t.datetime_start for t in self.trials if t.datetime_start)
        ended = sorted((t for t in self.trials if t.datetime_complete), key=_end)
        epochs = 0.0
        for t in ended:
            epochs += int(t.user_attrs.get("epochs_trained") or 0)
            if t.state.name == "COMPLETE" and t.values[1] >= target:
                return (t.datetime_complete - start).total_seconds(), epochs
        return math.inf, math.inf

    def record(self) -> dict:
        """What bench/results/sweep.json keeps of it, trial by trial."""
        start = min(t.datetime_start for t in self.trials if t.datetime_start)
        trials = [
            {
                "number": t.number,
                "state": t.state.name,
                "params": t.params,
                "epochs_trained": t.user_attrs.get("epochs_trained"),
                "val_accuracy": t.values[1] if t.values else None,
                "val_loss_by_epoch": t.user_attrs.get("val_loss_by_epoch"),
                "val_accuracy_by_epoch": t.user_attrs.get("val_accuracy_by_epoch"),
                "ended_s": round((t.datetime_complete - start).total_seconds(), 2),
            }
            for t in sorted(self.trials, key=_end)
        ]
        return {"wall_s": self.wall, "cpu_s": self.cpu, "trials": trials}


def _end(trial):
    return trial.datetime_complete


# --------------------------------------------------------------------------- replay
# Three seeds say little about a ratio that hangs on where the first good trial falls. The
# replay draws many sweeps from the recorded curves of the unpruned trials TPE drew at
# random (a draw from the space itself; its later trials are guided, so richer in good
# ones) and applies the project's rule (imgpipe.sweep.pruning.prunes_after) to each, at
# several settings, and a judge that is never wrong (perfect_judge): what no rule that
# judges at the same moments can beat.
RANDOM_TRIALS = 10  # TPESampler's n_startup_trials, which conf/train_model.yaml keeps


def val_target(finals: list[float], n_val: int) -> float:
    """The sweep's final best less max(0.5 point, 2 standard errors of a val accuracy)."""
    best = max(finals)
    se = math.sqrt(best * (1 - best) / n_val) if n_val else 0.0
    return best - max(0.005, 2 * se)


def _unpruned(order: list[list[float]], n_val: int) -> tuple[float, int, int]:
    """The target of a replayed sweep, the epochs to it unpruned, and the index of the
    trial that first reaches it."""
    target = val_target([c[-1] for c in order], n_val)
    first = next(i for i, c in enumerate(order) if c[-1] >= target)
    return target, sum(len(c) for c in order[: first + 1]), first


def replay_sweep(order: list[list[float]], n_val: int, startup: int, warmup: int) -> tuple:
    """One replayed sweep over the val-accuracy curves ``order``, in that order: the
    epochs to the target without pruning and with the median rule (inf if never), and
    where the unpruned sweep first reached it (1-based)."""
    target, plain, first = _unpruned(order, n_val)
    rule = PrunerSettings(name="median", startup_trials=startup, warmup_epochs=warmup)
    complete: list[list[float]] = []
    spent = 0
    for curve in order:
        stopped = next(  # the last epoch is never pruned
            (e for e in range(1, len(curve)) if prunes_after(e, curve, complete, rule, "maximize")),
            None,
        )
        spent += stopped or len(curve)
        if stopped:
            continue
        complete.append(curve)
        if curve[-1] >= target:
            return plain, spent, first + 1
    return plain, math.inf, first + 1


def perfect_judge(order: list[list[float]], n_val: int, startup: int, warmup: int) -> tuple:
    """As replay_sweep, with a judge that is never wrong in place of the median rule: it
    stops every trial that will miss the target at the first moment the rule may judge
    (once ``startup`` trials are complete, after epoch ``warmup`` + 1) and never stops
    one that will reach it. No rule judging at those moments can stop trials sooner, so
    on curves of equal length (a sweep's) its ratio bounds what any such pruner saves."""
    target, plain, first = _unpruned(order, n_val)
    spent, complete = 0, 0
    for curve in order:
        if curve[-1] >= target:
            return plain, spent + len(curve), first + 1
        judged = complete >= max(1, startup) and len(curve) > warmup + 1
        spent += warmup + 1 if judged else len(curve)
        complete += not judged
    return plain, math.inf, first + 1


def replay(
    curves: list[list[float]],
    n_val: int,
    trials: int,
    startup: int,
    warmup: int,
    draws: int = 2000,
    judge=replay_sweep,
) -> list[tuple]:
    """``draws`` sweeps of ``trials`` trials drawn at random (with replacement) from the
    recorded ``curves``: a random sweep, as TPE's start-up trials are; its later, guided
    proposals (and how they react to pruned trials) are not modelled. The same draws
    for every ``judge`` and setting (one seed)."""
    rng = random.Random(0)
    return [
        judge([rng.choice(curves) for _ in range(trials)], n_val, startup, warmup)
        for _ in range(draws)
    ]


def replay_rows(
    curves: list[list[float]], n_val: int, trials: int
) -> list[tuple[str, str, str, str]]:
    """The replay's rows: the rule at the project's defaults, then at other settings."""
    startup, warmup = PrunerSettings().startup_trials, PrunerSettings().warmup_epochs

    def summary(runs: list[tuple]) -> tuple[float, float, float]:
        ratios = sorted(p / u for u, p, _ in runs)
        return (
            statistics.median(ratios),
            sum(r <= 0.6 for r in ratios) / len(ratios),
            sum(math.isinf(r) for r in ratios) / len(ratios),
        )

    runs = replay(curves, n_val, trials, startup, warmup)
    ratio, met, lost = summary(runs)
    name = f"replay, {len(runs):,} random sweeps over {len(curves)} of these curves"
    rows = [
        (
            f"{name}: epochs to target, pruned / unpruned (median)",
            f"{ratio:.2f}x",
            "<= 0.6x",
            _ok(ratio, 0.6),
        ),
        (
            f"{name}: sweeps at <= 0.6x / never reaching the target",
            f"{100 * met:.0f} / {100 * lost:.0f} %",
            "",
            "measured",
        ),
    ]
    last = RANDOM_TRIALS
    bands = [(1, startup), (startup + 1, 2 * startup), (2 * startup + 1, last), (last + 1, trials)]
    parts = []
    for low, high in bands:
        band = [r for r in runs if low <= r[2] <= high]
        if band and low <= high:
            med_band = statistics.median(p / u for u, p, _ in band)
            parts.append(f"{low}-{high}: {med_band:.2f}x ({100 * len(band) / len(runs):.0f} %)")
    rows.append(
        (
            f"{name}: the ratio by the trial that first reaches the target unpruned (share of sweeps)",
            "; ".join(parts),
            "",
            "measured",
        )
    )
    for judge_startup in (startup, 1):
        ratio, met, _ = summary(
            replay(curves, n_val, trials, judge_startup, warmup, judge=perfect_judge)
        )
        rows.append(
            (
                f"{name}, a judge that is never wrong at the rule's moments (start-up trials "
                f"{judge_startup}, warm-up epochs {warmup}): median ratio / sweeps at <= 0.6x",
                f"{ratio:.2f}x / {100 * met:.0f} %",
                "",
                "bound",
            )
        )
    for other_startup, other_warmup in ((1, warmup), (startup, 0), (5, warmup)):
        ratio, met, lost = summary(replay(curves, n_val, trials, other_startup, other_warmup))
        rows.append(
            (
                f"{name}, start-up trials {other_startup}, warm-up epochs {other_warmup}: median ratio / never reaching",
                f"{ratio:.2f}x / {100 * lost:.0f} %",
                "",
                "measured",
            )
        )
    return rows


def replay_recorded(topic: str, title: str, out: Path) -> int:
    """Rewrite ``topic``'s section of ``out``/RESULTS.md with its replay rows redone from
    ``out``/results/ (the last run's records)."""
    recorded_at = out / "results" / f"{topic}.json"
    if not recorded_at.is_file():
        run = f"python -m bench sweep{' --space wide' if topic.endswith('-wide') else ''}"
        print(
            f"error: {recorded_at}: no recorded sweeps to replay (run {run} first)", file=sys.stderr
        )
        return 1
    recorded = json.loads(recorded_at.read_text())
    curves = [
        t["val_accuracy_by_epoch"]
        for sweep in recorded["plain"]
        for t in sweep["trials"]
        if t["state"] == "COMPLETE" and t["number"] < RANDOM_TRIALS
    ]
    kept = [tuple(r) for r in recorded["rows"] if not r[0].startswith("replay")]
    rows = kept + replay_rows(curves, recorded["n_val"], recorded["trials_per_sweep"])
    for row in rows:
        print(" | ".join(row))
    data = {k: v for k, v in recorded.items() if k != "rows"}
    write_section(topic, title, recorded["intro"], rows, data, out / "RESULTS.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=3, help="seeds, each arm once per seed")
    parser.add_argument("--smoke", action="store_true", help="4 x 2 epochs, 1 round, no section")
    parser.add_argument(
        "--space", choices=("lr", "wide"), default="lr", help="lr (and batch size) or several keys"
    )
    parser.add_argument(
        "--replay", action="store_true", help="redo the replay rows from the last run's records"
    )
    parser.add_argument("--out", type=Path, default=BENCH, help="where RESULTS.md is")
    args = parser.parse_args(argv)
    wide = args.space == "wide"
    space = [*WIDE_FIXED, *WIDE] if wide else [*FIXED, *SPACE]
    topic, title = (f"{TOPIC}-wide", f"{TITLE}, several keys") if wide else (TOPIC, TITLE)
    if args.replay:
        return replay_recorded(topic, title, args.out)
    trials, epochs, rounds = (4, 2, 1) if args.smoke else (args.trials, args.epochs, args.rounds)
    images = 240 if args.smoke else args.images
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-sweep-") as tmp:
        work = Path(tmp)
        data = make_data(work, images)
        n_val = len(np.load(data / "val_labels.npy"))
        n_train = len(np.load(data / "train_labels.npy"))
        plain: list[Sweep] = []
        pruned: list[Sweep] = []
        for i in range(rounds):  # alternated: a shared machine drifts between runs
            seed = f"hydra.sweeper.sampler.seed={SEED + i}"
            plain.append(run_sweep(work, data, f"plain-{i}", trials, epochs, space, seed))
            pruned.append(run_sweep(work, data, f"pruned-{i}", trials, epochs, space, seed, *PRUNE))
            if i == 0:  # the 1-worker run is this round's unpruned sweep, just before
                two = run_sweep(
                    work, data, "workers-2", trials, epochs, space, seed, "hydra.sweeper.n_jobs=2"
                )
    one = plain[0]

    med = statistics.median
    targets = [p.target(n_val) for p in plain]
    at_plain = [p.reached(t) for p, t in zip(plain, targets, strict=True)]
    at_pruned = [p.reached(t) for p, t in zip(pruned, targets, strict=True)]
    accs = [a for p in plain for a in p.accuracies()]
    good = sum(a >= max(accs) - 0.05 for a in accs)

    def ratio(values: list[float], of: list[float]) -> float:
        return med(v / o for v, o in zip(values, of, strict=True))

    ep = ratio([p.epochs for p in pruned], [p.epochs for p in plain])
    to_s = ratio([s for s, _ in at_pruned], [s for s, _ in at_plain])
    to_ep = ratio([e for _, e in at_pruned], [e for _, e in at_plain])
    rows = [
        ("final val accuracy of unpruned trials: min / median / max", f"{100 * min(accs):.0f} / {100 * med(accs):.0f} / {100 * max(accs):.0f} %", "", ""),
        ("spread of final val accuracy (unpruned trials, SD)", f"{100 * statistics.pstdev(accs):.1f} pt", "", ""),
        ("unpruned trials within 5 pt of their sweep's best", f"{good} of {len(accs)}", "", ""),
        ("target: best val accuracy within", f"{100 * med(max(p.accuracies()) - t for p, t in zip(plain, targets, strict=True)):.1f} pt", "", ""),
        ("epochs trained, no pruning", f"{med(p.epochs for p in plain):.0f}", "", "measured"),
        ("epochs trained, median pruning", f"{med(p.epochs for p in pruned):.0f} ({med(p.pruned for p in pruned):.0f} trials pruned)", "", "measured"),
        ("epochs, pruned / unpruned", f"{ep:.2f}x", "<= 0.6x", _ok(ep, 0.6)),
        ("wall time, no pruning / median pruning", f"{med(p.wall for p in plain):.0f} / {med(p.wall for p in pruned):.0f} s", "", "measured"),
        ("wall time, pruned / unpruned", f"{ratio([p.wall for p in pruned], [p.wall for p in plain]):.2f}x", "", "measured"),
        ("CPU time, pruned / unpruned", f"{ratio([p.cpu for p in pruned], [p.cpu for p in plain]):.2f}x", "", "measured"),
        ("epochs to target, no pruning / median pruning", f"{med(e for _, e in at_plain):.0f} / {med(e for _, e in at_pruned):.0f}", "", "measured"),
        ("epochs to target, pruned / unpruned", f"{to_ep:.2f}x", "<= 0.6x", _ok(to_ep, 0.6)),
        ("time to target, no pruning / median pruning", f"{med(s for s, _ in at_plain):.0f} / {med(s for s, _ in at_pruned):.0f} s", "", "measured"),
        ("time to target, pruned / unpruned", f"{to_s:.2f}x", "<= 0.6x", _ok(to_s, 0.6)),
        ("journal storage, 1 worker / 2 workers", f"{one.wall:.0f} / {two.wall:.0f} s", "", "measured"),
        ("2 workers / 1 worker wall time", f"{two.wall / one.wall:.2f}x", "", "measured"),
    ]  # fmt: skip
    rows += replay_rows([c for p in plain for c in p.random_curves()], n_val, trials)
    for row in rows:
        print(" | ".join(row))
    load = os.getloadavg()[0]
    intro = (
        f"Photo-like JPEGs at 32x32 RGB ({n_train} train, {n_val} val images), timm "
        f"{MODEL}, {'' if wide else 'AdamW, '}{trials} trials x {epochs} epochs, "
        f"space {' '.join(WIDE if wide else SPACE)}, "
        f"TPE seeds {', '.join(str(SEED + i) for i in range(rounds))} (one round each, "
        f"arms alternated; ratios per round, median), {' '.join(PRUNE)} (other settings "
        f"at their defaults), {available_cpus()} CPUs, load average {load_before:.1f} at the start "
        f"and {load:.1f} at the end, MLflow off, OMP_WAIT_POLICY=PASSIVE."
    )
    data_out = {
        "intro": intro,
        "n_val": n_val,
        "trials_per_sweep": trials,
        "targets": targets,
        "plain": [p.record() for p in plain],
        "pruned": [p.record() for p in pruned],
        "workers_2": two.record(),
        "load_average": [load_before, load],
    }
    # A smoke run writes beside the report, never into it, and under a name of its own:
    # --replay reads results/<topic>.json, the last full run's curves.
    if args.smoke:
        write_section(f"{topic}-smoke", title, intro, rows, data_out, args.out / "smoke.md")
    else:
        write_section(topic, title, intro, rows, data_out, args.out / "RESULTS.md")
    return 0


def _ok(ratio: float, limit: float) -> str:
    return "met" if ratio <= limit else "missed"


if __name__ == "__main__":
    raise SystemExit(main())
