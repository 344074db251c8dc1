"""Predictions: the predict stage against a bare loop and a one-image-at-a-time loop, the
server's latency and throughput, and what tracking costs a fresh `make train`. Writes the
"Predictions" section of RESULTS.md.

    python -m bench predict            # 36000 grey 28x28 digit PNGs and 6000 8x8, 3 rounds
    python -m bench predict --smoke    # 300 of each, 1 round, 1-epoch trainings: no section

Rows:
- images/s of ``imgpipe predict`` (the command `make predict` runs, interpreter start-up and
  the written outputs included) and of the stage's own work (``predict.predict_folder``, in
  this process) against ``bare_loop``: the same files, model (the seed CNN, model.pt) and
  batch, decoded with Pillow and classified in one process, nothing written (target >=
  0.85x); and against ``one_at_a_time``: decode one file, one forward pass (target >= 10x).
  The command's fixed cost (its seconds less the stage's for the same files) is a row of
  its own: it is what a small folder pays. Two image sizes: 28x28 (the seed CNN's arithmetic,
  about 1 ms an image on two cores, is most of the time) and 8x8 (the sample's size and
  `make predict`'s default model: a forward call's fixed cost is most of it);
- `make serve` (``imgpipe serve``, the sample digits' seed CNN): seconds from the process's
  start to /ready 200; one client on a kept-alive connection, p50/p99 of /predict; 8
  clients (threads, each its own connection), requests/s of /predict and of /health (the
  no-op endpoint) on the same server;
- a fresh `make train` on the sample (no MLflow store yet: it is created during the run)
  and a second one (the store exists): the tracking seconds the run counts on its training
  thread (its `done in` line) against its wall time (target <= 10%), and whether the run
  ended FINISHED with its model logged.
Stage and baselines alternate in each round; each keeps its best round. Every process
measured runs with OMP_WAIT_POLICY=PASSIVE (unless set otherwise).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP, and inherited by every command measured here: on a shared
# machine a spinning 2-thread team collapses (bench/NOTES.md, the DDP section).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.dataset import generate
from bench.sections import BENCH, Row, write_section
from imgpipe.data import process_dataset
from imgpipe.testing import REPO, VENV, copy_project, free_port, make, stop

TOPIC = "predict"
TITLE = "Predictions"
BATCH = 256  # conf/predict.yaml's predict_batch_size
DONE = re.compile(r"done in ([\d.]+)s \(tracking: ([\d.]+)s on the training thread")


# --------------------------------------------------------------------------- the model


def save_untrained(processed: Path, path: Path) -> Path:
    """The seed CNN for ``processed`` saved as model.pt (speed does not depend on weights)."""
    from imgpipe.checkpoint import save_model
    from imgpipe.data import load_processed
    from imgpipe.models import build_model, spec_for

    torch.manual_seed(0)
    spec = spec_for(load_processed(processed), "convnet")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_model(path, build_model(spec), spec)


# --------------------------------------------------------------------------- batch predictions


def _forward(network: torch.nn.Module, rows: np.ndarray, scale, shift) -> torch.Tensor:
    x = torch.from_numpy(rows).permute(0, 3, 1, 2).float().mul_(scale).sub_(shift)
    return network(x).argmax(1)


def bare_loop(paths: list[str], model: Path, batch: int) -> float:
    """Images/s: Pillow decode of each batch, then one forward pass, in this process."""
    from imgpipe.engine import normalisation
    from imgpipe.models import load_model_file

    network, spec = load_model_file(model)
    network.eval()
    scale, shift = normalisation(spec.mean, spec.std)
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            rows = []
            for path in paths[start : start + batch]:
                with Image.open(path) as im:
                    rows.append(
                        np.asarray(im.convert(spec.image_mode)).reshape(*spec.input_size, -1)
                    )
            _forward(network, np.stack(rows), scale, shift)
    return len(paths) / (time.perf_counter() - started)


# The bare loop as a user's own script: its interpreter, torch's import and the model's load
# are in its time, as imgpipe predict's start-up is in the command's.
BARE_SCRIPT = """
import sys, time
started = time.perf_counter()
from pathlib import Path
from bench.predict import bare_loop
paths = Path(sys.argv[1]).read_text().split()
bare_loop(paths, Path(sys.argv[2]), int(sys.argv[3]))
"""


def bare_script(paths: list[str], model: Path, batch: int, work: Path) -> float:
    """Images/s of ``bare_loop`` run as a script of its own (process start to exit)."""
    listed = work / "paths.txt"
    listed.write_text("\n".join(paths))
    cmd = [str(VENV / "bin" / "python"), "-c", BARE_SCRIPT, str(listed), str(model), str(batch)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the bare-loop script failed: {proc.stderr[-2000:]}")
    return len(paths) / seconds


def one_at_a_time(paths: list[str], model: Path) -> float:
    """Images/s of the upstream's way: one file decoded, one forward pass, then the next."""
    return bare_loop(paths, model, 1)


def stage_in_process(paths_dir: Path, model: Path, out: Path) -> float:
    """Images/s of ``predict_folder`` (the stage's work: listing, decoding on every core,
    batches, the written outputs), model loaded before the clock starts."""
    from imgpipe.inference import Classifier
    from imgpipe.predict import predict_folder

    classifier = Classifier.load(model)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = predict_folder(classifier, paths_dir, out, batch_size=BATCH)
    return result.predicted / (time.perf_counter() - started)


def stage_command(paths_dir: Path, model: Path, out: Path, count: int, cwd: Path) -> float:
    """Images/s of ``imgpipe predict`` as `make predict` runs it (process start to exit)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(VENV / "bin" / "imgpipe"),
        "predict",
        f"predict_input={paths_dir}",
        f"predict_model={model}",
        f"predict_output_dir={out}",
        f"log_dir={cwd / 'logs'}",
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"imgpipe predict failed: {proc.stderr[-2000:]}")
    return count / seconds


# --------------------------------------------------------------------------- the server


def serve_numbers(model: Path, image: bytes, cwd: Path, requests: int) -> dict[str, float]:
    """Start `imgpipe serve`, time it to /ready, then one client and 8 clients."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(VENV / "bin" / "imgpipe"), "serve", f"serve_model={model}", f"serve_port={port}"]
    started = time.perf_counter()
    with open(cwd / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready_s = _wait_ready(url, proc, started, cwd / "serve.log")
        headers = {"Content-Type": "image/png"}
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(20):  # warm-up: the thread pool, the first forward passes
                client.post("/predict", content=image, headers=headers).raise_for_status()
            latencies = []
            for _ in range(requests):
                t0 = time.perf_counter()
                client.post("/predict", content=image, headers=headers).raise_for_status()
                latencies.append(time.perf_counter() - t0)
        q = statistics.quantiles(latencies, n=100)
        return {
            "ready_s": ready_s,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": q[98] * 1000,
            "predict_rps": _clients(url, "/predict", image, headers, 8, requests // 4),
            "health_rps": _clients(url, "/health", None, {}, 8, requests // 4),
        }
    finally:
        stop(proc)


def _wait_ready(url: str, proc: subprocess.Popen, started: float, log: Path) -> float:
    import httpx

    while True:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - started > 120:
            raise RuntimeError(f"imgpipe serve did not get ready: {log.read_text()[-2000:]}")
        time.sleep(0.02)


def _clients(url: str, path: str, body: bytes | None, headers: dict, n: int, each: int) -> float:
    """Requests/s of ``n`` threads, each on its own kept-alive connection."""
    import httpx

    failures: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(each):
                r = c.post(path, content=body, headers=headers) if body else c.get(path)
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=client) for _ in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{path}: {len(failures)} failed requests: {failures[0]}")
    return n * each / seconds


# --------------------------------------------------------------------------- tracking's share


def train_runs(project: Path, epochs: int) -> dict[str, dict[str, float | bool]]:
    """`make train` with no store yet, then again: each run's wall time, the tracking
    seconds its `done in` line counts, and whether MLflow holds a FINISHED run with the
    model logged (its digests param, recorded right after the model)."""
    from mlflow import MlflowClient

    out: dict[str, dict[str, float | bool]] = {}
    shutil.rmtree(project / "mlruns", ignore_errors=True)
    for name in ("fresh", "existing"):
        started = time.perf_counter()
        proc = make("train", project, f"ARGS=epochs={epochs}")
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"make train failed: {(proc.stdout + proc.stderr)[-2000:]}")
        found = DONE.search(proc.stdout + proc.stderr)
        assert found, (proc.stdout + proc.stderr)[-2000:]
        client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
        (run,) = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        out[name] = {
            "make_s": wall,
            "train_s": float(found.group(1)),
            "tracking_s": float(found.group(2)),
            "finished_with_model": run.info.status == "FINISHED"
            and any(k.startswith("model_sha256.") for k in run.data.params),
        }
    return out


# --------------------------------------------------------------------------- the section


def status(value: float, target: float, above: bool = True) -> str:
    return "met" if (value >= target if above else value <= target) else "not met"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=36000, help="28x28 images (5 in 6 read)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, no section")
    parser.add_argument("--out", type=Path, default=BENCH, help="where RESULTS.md is")
    args = parser.parse_args(argv)
    count, rounds = (300, 1) if args.smoke else (args.images, args.rounds)
    epochs, requests = (1, 40) if args.smoke else (10, 400)
    load_before = os.getloadavg()[0]
    runs: dict[int, dict[str, list[float]]] = {}
    sizes: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-predict-") as tmp:
        work = Path(tmp)
        for size, n in ((28, count), (8, min(count, 7200))):
            where = work / f"digits{size}"
            generate(where / "raw", n, size, os.cpu_count() or 1)
            process_dataset(where / "raw", where / "processed")
            model = save_untrained(where / "processed", where / "model.pt")
            folder = where / "raw" / "train"  # listed by train.csv beside it, labels included
            paths = sorted(str(p) for p in folder.rglob("*.png"))
            few = paths[: min(len(paths), 400 if size > 8 else 2000)]  # the slow loop: a subset
            sizes[size] = len(paths)
            mine = runs.setdefault(size, {})
            for _ in range(rounds):
                mine.setdefault("bare", []).append(bare_loop(paths, model, BATCH))
                mine.setdefault("script", []).append(bare_script(paths, model, BATCH, where))
                mine.setdefault("stage", []).append(stage_in_process(folder, model, work / "out"))
                mine.setdefault("command", []).append(
                    stage_command(folder, model, work / "out", len(paths), work)
                )
                mine.setdefault("single", []).append(one_at_a_time(few, model))

        project = copy_project(work / "project")
        for target in ("data", "process-data"):
            if (proc := make(target, project)).returncode != 0:
                raise RuntimeError(f"make {target}: {(proc.stdout + proc.stderr)[-2000:]}")
        digits = save_untrained(project / "data" / "processed", work / "digits" / "model.pt")
        image = next((project / "data" / "raw" / "test").rglob("*.png")).read_bytes()
        served = serve_numbers(digits, image, work, requests)
        trained = train_runs(project, epochs)
    load_after = os.getloadavg()[0]

    rows: list[Row] = []
    for size, mine in runs.items():
        best = {key: max(values) for key, values in mine.items()}
        n = sizes[size]
        fixed = n / best["command"] - n / best["stage"]
        names = {
            "command": "imgpipe predict (make predict, start-up included)",
            "stage": "predict_folder (the stage's work, no start-up)",
        }
        for baseline, label, target in (
            ("bare", "bare loop", 0.85),
            ("single", "one image at a time", 10),
        ):
            for key, name in names.items():
                ratio = best[key] / best[baseline]
                rows.append(
                    (
                        f"{name} / {label}, {size}x{size} "
                        f"({best[key]:.0f} / {best[baseline]:.0f} images/s)",
                        f"{ratio:.2f}x",
                        f">= {target}x",
                        status(ratio, target),
                    )
                )
        ratio = best["command"] / best["script"]
        rows.append(
            (
                f"{names['command']} / bare loop as a script of its own (its start-up, torch's "
                f"import and the model's load included), {size}x{size} "
                f"({best['command']:.0f} / {best['script']:.0f} images/s)",
                f"{ratio:.2f}x",
                ">= 0.85x",
                status(ratio, 0.85),
            )
        )
        rows.append(
            (
                f"imgpipe predict's fixed cost (its seconds less the stage's), {size}x{size} "
                f"({n} images)",
                f"{fixed:.2f} s",
                "",
                "measured",
            )
        )
    rows += [
        ("make serve: process start to /ready 200", f"{served['ready_s']:.2f} s", "", "measured"),
        (
            "make serve, 1 client, keep-alive: /predict p50 / p99",
            f"{served['p50_ms']:.1f} / {served['p99_ms']:.1f} ms",
            "",
            "measured",
        ),
        (
            "make serve, 8 clients: /predict / /health (no-op) requests/s "
            f"({served['predict_rps']:.0f} / {served['health_rps']:.0f})",
            f"{served['predict_rps'] / served['health_rps']:.2f}x",
            "",
            "measured",
        ),
    ]
    for name, said in (("fresh", "new MLflow store"), ("existing", "existing store")):
        t = trained[name]
        share = float(t["tracking_s"]) / float(t["train_s"])
        rows.append(
            (
                f"make train on the sample, {said}: tracking on the training thread "
                f"({t['tracking_s']:.2f} s of {t['train_s']:.1f} s; make {t['make_s']:.1f} s; "
                f"{'FINISHED, model logged' if t['finished_with_model'] else 'MODEL NOT LOGGED'})",
                f"{share:.1%}",
                "<= 10%",
                status(share, 0.10, above=False) if t["finished_with_model"] else "not met",
            )
        )
    for row in rows:
        print(" | ".join(row))
    intro = (
        f"Grey digit PNGs (bench.dataset: {sizes[28]} 28x28 and {sizes[8]} 8x8, the train "
        f"split's), an untrained seed CNN for each size as model.pt, batch {BATCH}, best of "
        f"{rounds} alternated rounds; the one-image loop over the first 400 (28x28) or 2000 "
        f"(8x8) of them. Serving: the sample digits' seed CNN (8x8 grey PNG uploads), {requests} "
        f"requests for one client, 8 x {requests // 4} for eight. Trainings: the sample, "
        f"{epochs} epochs. {os.cpu_count()} CPUs, load average {load_before:.1f} before, "
        f"{load_after:.1f} after."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / ("smoke.md" if args.smoke else "RESULTS.md")
    write_section(
        TOPIC, TITLE, intro, rows, {"runs": runs, "serve": served, "train": trained}, target
    )
    return 0
