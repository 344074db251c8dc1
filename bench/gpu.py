"""Everything a GPU changes, measured in one go (under 8 minutes on one CUDA machine).
Writes the "GPU" section of RESULTS.md (bench/sections.py) and bench/results/gpu.json.

    python -m bench gpu             # on a CUDA machine
    python -m bench gpu --smoke     # the same steps on the CPU, tiny: checks the script runs

Without a CUDA device it prints one line saying so, leaves any measured GPU rows as they
are (or writes the section saying they were not measured yet) and exits 1.

Steps (each a row):
1. the train stage on CUDA with the split kept on the device (the default when it fits);
2. the same with forced pinned host copies (the path for splits larger than a quarter of
   the free GPU memory);
3. ``bf16=true``; 4. ``compile=true``;
5. nccl DDP over the visible GPUs: per-GPU throughput with N GPUs against one GPU's
   (target >= 0.9x; needs two GPUs);
6. the sweep with one worker per GPU (worker i sees GPU i mod count);
7. the benchmark's GPU rows: the real stage against a bare loop and against per-item PNG
   loading (target >= 3x over per-item loading).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.dataset import generate
from bench.measure import TRAIN_RESULT_AS_JSON
from bench.runs import bench_training
from bench.sections import RESULTS_MD, sections, write_section
from imgpipe.data import load_processed, process_dataset
from imgpipe.testing import REPO, copy_project, make, run_outputs, train_config

TOPIC = "gpu"
TITLE = "GPU"
NOT_MEASURED = [("every GPU row", "not measured yet", "", "no CUDA machine has run bench/gpu.py")]


def no_cuda_section() -> None:
    """The section saying the rows were not measured, unless measured rows are there."""
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else ""
    if TOPIC not in sections(text):
        intro = "bench/gpu.py runs these rows on a CUDA machine; none has run it yet."
        write_section(TOPIC, TITLE, intro, NOT_MEASURED, {"measured": False})


@contextlib.contextmanager
def pinned_copies() -> Iterator[None]:
    """Make the split look too big for the GPU: batches then come from pinned host memory."""
    import torch

    real = torch.cuda.mem_get_info
    torch.cuda.mem_get_info = lambda device=None: (0, real(device)[1])  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.mem_get_info = real  # type: ignore[assignment]


def images_per_s(result, n: int, epochs: int) -> float:
    return n * epochs / result.timings.fit_s


def ddp_run(work: Path, data: Path, procs: int, epochs: int, device: str) -> float:
    """Images per second per process of a `procs`-process training (rank 0's fit time)."""
    root = work / f"ddp-{procs}"
    result = root / "result.json"
    overrides = [
        f"data_dir_path={data}",
        f"epochs={epochs}",
        f"device={device}",
        f"nproc_per_node={procs}",
        f"mlflow_tracking_uri=sqlite:///{work / 'store.db'}",
        *(f"{k}={v}" for k, v in run_outputs(root).items()),
    ]
    runner = [
        "-c",
        TRAIN_RESULT_AS_JSON,
        str(result),
        str(REPO / "src" / "train_model.py"),
    ]
    cmd = [sys.executable, "-m", "imgpipe.distributed", "--standalone"]
    cmd += [f"--nproc-per-node={procs}", "--no-python", sys.executable, *runner, *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not result.is_file():
        raise SystemExit(f"error: DDP on {procs} failed: {done.stderr.strip()[-500:]}")
    timings = json.loads(result.read_text())["timings"]
    from imgpipe.data.processed import load_processed

    n = len(load_processed(data).train.labels)
    return n * epochs / timings["fit_s"] / procs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny, no section written")
    args = parser.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            f"no CUDA device: bench/gpu.py did not run (torch {torch.__version__}, "
            f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'}); "
            "RESULTS.md keeps its GPU rows, or says they were not measured yet",
            file=sys.stderr,
        )
        no_cuda_section()
        return 1
    device = "cpu" if args.smoke else "cuda"
    images, epochs = (1200, 1) if args.smoke else (args.images, args.epochs)
    gpus = 0 if args.smoke else torch.cuda.device_count()
    rows, data_out = [], {"device": device, "gpus": gpus, "images": images, "epochs": epochs}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-gpu-") as tmp:
        work = Path(tmp)
        generate(work / "raw", images, 28, os.cpu_count() or 1)
        data = work / "processed"
        process_dataset(work / "raw", data)
        from imgpipe.train import train

        def stage(name: str, **changes) -> float:
            cfg = train_config(
                data, work / name, store=work / "store.db", epochs=epochs, device=device,
                live_images=False, **changes,
            )  # fmt: skip
            result = train(cfg)
            n = len(load_processed(data).train.labels)
            return images_per_s(result, n, epochs)

        on_device = stage("on-device")
        rows.append(("train stage, split on the device", f"{on_device:,.0f} img/s", "", "measured"))
        if device == "cuda":
            with pinned_copies():
                pinned = stage("pinned")
            rows.append(("train stage, pinned host copies", f"{pinned:,.0f} img/s", "", "measured"))
        bf16 = stage("bf16", bf16=True)
        rows.append(("train stage, bf16=true", f"{bf16:,.0f} img/s", "", "measured"))
        if device == "cuda":  # the CPU smoke skips the minute of compiling
            compiled = stage("compile", compile=True)
            rows.append(("train stage, compile=true", f"{compiled:,.0f} img/s", "", "measured"))

        procs = max(gpus, 2)
        one = ddp_run(work, data, 1, epochs, device) if gpus >= 2 or device == "cpu" else None
        if gpus >= 2 or device == "cpu":
            many = ddp_run(work, data, procs, epochs, device)
            ratio = many / one
            status = "pass" if ratio >= 0.9 else "below target"
            label = f"DDP per-{'GPU' if gpus else 'process'} throughput, {procs} vs 1"
            rows.append((label, f"{ratio:.2f}x", ">= 0.9x", status))
            data_out |= {"ddp_one_ips": one, "ddp_many_ips": many}
        else:
            rows.append(("DDP per-GPU throughput", "needs 2 GPUs", ">= 0.9x", "not measured"))

        project = copy_project(work / "project")
        workers = max(gpus, 1)
        sweep_args = (
            f"ARGS=epochs=1 device={device} data_dir_path={data} "
            f"hydra.sweeper.n_trials={workers} hydra.sweeper.storage=null"
        )
        t0 = time.perf_counter()
        swept = make("sweep", project, f"WORKERS={workers}", sweep_args, timeout=300)
        sweep_s = time.perf_counter() - t0
        status = "measured" if swept.returncode == 0 else "failed"
        rows.append((f"sweep, {workers} worker(s) one per GPU", f"{sweep_s:.0f} s", "", status))

        training = bench_training(work, work / "raw", data, epochs, 64, 1)
        over_items = training["real_sps"] / training["per_item_sps"]
        rows.append(("real stage / bare loop", f"{training['real_sps'] / training['bare_sps']:.2f}x", "", "measured"))  # fmt: skip
        rows.append(("real stage / per-item PNG loading", f"{over_items:.1f}x", ">= 3x",
                     "pass" if over_items >= 3 else "below target"))  # fmt: skip
        data_out |= {"training": training, "seconds": time.perf_counter() - started}
    for row in rows:
        print(" | ".join(row))
    if not args.smoke:
        name = torch.cuda.get_device_name(0)
        intro = f"{gpus} x {name}, {images} images of 28x28, {epochs} epochs, global batch 64."
        write_section(TOPIC, TITLE, intro, rows, data_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
