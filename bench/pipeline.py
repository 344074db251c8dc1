"""The main table: the pipeline against naive baselines and the hardware's limits, in one run.

Usage (from the project root; `make bench` runs the default):
    python -m bench                     # 60,000 28x28 images; writes bench/results.json + RESULTS.md
    python -m bench --images 1000000    # the scale run: peak memory of processing at 1M
    python -m bench --smoke             # tiny sizes, every row, seconds (the test suite runs this)
    python -m bench --render            # only rewrite RESULTS.md's main table from results.json

Every number is a ratio measured in the same run on the same machine. Timings are
reported, never asserted. The story of one run: generate the dataset (bench/dataset.py),
the five runs (bench/runs.py), the rows against their targets (bench/targets.py), the
report (bench/report.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.dataset import generate, subset
from bench.measure import machine, speed_reference
from bench.report import print_table, write_markdown
from bench.runs import bench_processing, bench_startup, bench_sweep, bench_tracking, bench_training
from bench.targets import rows
from imgpipe.cpus import available_cpus
from imgpipe.testing import REPO

SMOKE = {"images": 600, "size": 16, "train_images": 300, "naive_images": 50, "trials": 2,
         "epochs": 1, "repeats": 1, "tracking_repeats": 1}  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=60_000, help="images generated (1 in 6 test)")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels")
    parser.add_argument("--train-images", type=int, default=6_000, help="training subset size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--naive-images", type=int, default=5_000)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument(
        "--repeats", type=int, default=5, help="alternated runs of the real stage and bare loop"
    )
    parser.add_argument(
        "--tracking-repeats", type=int, default=3, help="alternated runs of each tracking mode"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks every row is produced"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite RESULTS.md's main table from results.json",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Every run of the main table, in order, on a dataset generated in ``work``."""
    cpus = available_cpus()
    started = time.perf_counter()
    raw = work / "raw"
    print(f"generating {args.images:,} {args.size}x{args.size} images in {work} ...", flush=True)
    generate(raw, args.images, args.size, cpus)
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{machine()}; {speed_reference()}",
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
    }
    print("processing ...", flush=True)
    results["processing"] = bench_processing(work, raw, args.naive_images, cpus)
    small = subset(
        work / "processed", work / "small", args.train_images, max(200, args.train_images // 6)
    )
    print("training ...", flush=True)
    results["training"] = bench_training(work, raw, small, args.epochs, args.batch, args.repeats)
    print("tracking ...", flush=True)
    results["tracking"] = bench_tracking(
        work, small, args.epochs, args.batch, args.tracking_repeats
    )
    print("sweeps ...", flush=True)
    # Trials as long as a real short trial: on 2 cores, seconds-long trials would
    # measure process start-up, not parallelism.
    results["sweep"] = bench_sweep(work, small, args.trials, args.epochs)
    tiny = subset(work / "processed", work / "tiny", max(300, args.train_images // 4), 200)
    print("start-up ...", flush=True)
    results["startup"] = bench_startup(work, tiny)
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render:
        results = json.loads((args.out / "results.json").read_text())
        table = [(r["measure"], r["value"], r["target"], r["status"]) for r in results["rows"]]
        write_markdown(results, table, args.out / "RESULTS.md")
        return 0
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    work = Path(tempfile.mkdtemp(prefix="imgpipe-bench-"))
    try:
        results = measure(args, work)
        table = rows(results)
        results["rows"] = [
            dict(zip(("measure", "value", "target", "status"), r, strict=True)) for r in table
        ]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print_table(results, table)
        print(f"\nbench took {results['seconds']:.0f}s; wrote {args.out / 'results.json'}")
        if not args.smoke:
            write_markdown(results, table, args.out / "RESULTS.md")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0
