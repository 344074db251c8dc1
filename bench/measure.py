"""How the benchmarks measure: timers, rates taking turns, a function's rate on every core,
process_data's rate, the peak memory of a process tree, a server settling after start-up, a
tracking request's round trip, the machine and its speed reference, and the entry point run
with its result captured."""

from __future__ import annotations

import contextlib
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from imgpipe.cpus import available_cpus
from imgpipe.data import process_dataset

Item = TypeVar("Item")


def peak_rss(cmd: list[str], cwd: Path) -> tuple[float, float, float]:
    """Run ``cmd``; return (seconds, peak PSS, peak RSS) of its whole process tree in MB.

    PSS counts a page shared by forked workers once in all; summed RSS counts it in every
    process, so it overstates what a pool of forked workers really uses.
    """
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak_pss = peak_rss = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            infos = [q.memory_full_info() for q in (parent, *parent.children(recursive=True))]
            peak_pss = max(peak_pss, sum(i.pss for i in infos))
            peak_rss = max(peak_rss, sum(i.rss for i in infos))
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read()[-2000:]}")
    return time.perf_counter() - start, peak_pss / 2**20, peak_rss / 2**20


def settle(pid: int, limit_s: float = 60.0) -> None:
    """Wait until a freshly started server stops burning CPU (workers importing), so
    its start-up is not billed to the training that follows."""
    import psutil

    root = psutil.Process(pid)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        tree = [root, *root.children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.cpu_percent(interval=None)
        time.sleep(1.0)
        busy = 0.0
        for p in tree:
            with contextlib.suppress(psutil.Error):
                busy += p.cpu_percent(interval=None)
        if busy < 10.0:
            return


def round_trip_ms(url: str, calls: int = 30) -> float:
    """Median milliseconds of one tracking request on a kept-alive connection, as the
    MLflow client sends them."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    client.search_experiments(max_results=1)  # connect first
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        client.search_experiments(max_results=1)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds)) * 1000


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def best_of_turns(runs: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each run's best rate of ``repeats``, the runs taking turns: on a shared machine the
    load changes under a run, and alternating spreads it over all of them alike."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    return best


def pool_rate(work: Callable[[list[Item]], int], items: list[Item], workers: int) -> float:
    """Items per second of ``work`` over ``items`` on ``workers`` processes, nothing else.
    ``work`` (picklable) takes a list of items and returns how many it did; every worker does
    one chunk first, untimed (imports, first calls)."""
    chunk = max(1, len(items) // (workers * 8))
    parts = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, parts[:workers]))  # warm the workers up
        start = time.perf_counter()
        done = sum(pool.map(work, parts))
    return done / (time.perf_counter() - start)


def process_rate(raw: Path, out: Path, images: int, **options: object) -> float:
    """Images per second of process_data (``process_dataset`` on every core) of the
    ``images`` in ``raw``, written to ``out`` and removed afterwards."""
    start = time.perf_counter()
    process_dataset(raw, out, 0, **options)
    rate = images / (time.perf_counter() - start)
    shutil.rmtree(out)
    return rate


# Runs the entry point argv[2] with the overrides after it, as `python SCRIPT ...` would, and
# writes what its train() call returns to argv[1] as JSON: the start-up row times the real
# entry point (Hydra included) and reads its numbers from the result, not from log lines.
TRAIN_RESULT_AS_JSON = """
import dataclasses, json, runpy, sys
import imgpipe.train

out, script, *overrides = sys.argv[1:]
real_train = imgpipe.train.train

def train(*args, **kwargs):
    result = real_train(*args, **kwargs)
    with open(out, "w") as fh:
        json.dump(dataclasses.asdict(result), fh)
    return result

imgpipe.train.train = train
sys.argv = [script, *overrides]
runpy.run_path(script, run_name="__main__")
"""


def succeeded(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args[:3]} failed: {(proc.stdout + proc.stderr)[-2000:]}")
    return proc


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {available_cpus()} cores{mem}{gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def speed_reference() -> str:
    """How fast this machine is on two fixed workloads, so runs on different machines can
    be compared: the rows of absolute seconds (no-op repro, first step, the bench's own
    time) scale with it, the ratio rows should not."""
    import torch

    loop_s = min(timed(sum, (i * i for i in range(3_000_000)))[0] for _ in range(3))
    a = torch.randn(512, 512)
    matmul_s = min(timed(lambda: [a @ a for _ in range(50)])[0] for _ in range(3))
    gflops = 50 * 2 * 512**3 / matmul_s / 1e9
    return (
        f"speed reference: a 3M-step Python loop {loop_s:.2f}s on one core, "
        f"float32 matmul {gflops:.0f} GFLOP/s on {torch.get_num_threads()} threads"
    )
