"""The benchmark harness produces every row (timings are never asserted)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imgpipe.testing import REPO


def run_bench(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`python -m bench ARGS` as `make bench` runs it, from another folder (nothing lands there)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_bench_module_with_a_main_is_a_listed_section(tmp_path: Path) -> None:
    runnable = {
        p.stem
        for p in (REPO / "bench").glob("*.py")
        if not p.stem.startswith("_") and re.search(r"^def main\(", p.read_text(), re.M)
    }
    listed = run_bench("--list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines()} == runnable
    unknown = run_bench("nope", cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: unknown benchmark section 'nope'"), unknown.stderr


def test_results_md_holds_tables_and_notes_md_the_reasoning_once() -> None:
    results = (REPO / "bench" / "RESULTS.md").read_text()
    notes = (REPO / "bench" / "NOTES.md").read_text()
    paragraphs = [p.strip() for p in notes.split("\n\n") if len(p.strip()) > 200]
    assert paragraphs
    pasted = [p[:60] for p in paragraphs if p in results]
    assert not pasted, f"RESULTS.md repeats NOTES.md: {pasted}"


@pytest.mark.slow
def test_bench_smoke_produces_every_row(tmp_path: Path) -> None:
    result = run_bench("--smoke", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    measures = [row["measure"] for row in results["rows"]]
    for expected in (
        "process_data vs decode limit",
        "process_data vs naive per-image",
        "process_data peak memory",
        "train epoch time vs bare loop",
        "train vs per-item PNG DataLoader",
        "tracking overhead, SQLite store",
        "tracking overhead, mlflow server (make mlflow-server",
        "tracking overhead, mlflow server (default",
        "tracking cost of a fresh process",
        "sweep per-trial overhead (1 worker)",
        "sweep trials/hour, 1 vs 2 workers",
        "no-op dvc repro",
        "entry point to first training step",
    ):
        # Some rows name their device or size: "train epoch time vs bare loop (cpu)".
        assert any(m.startswith(expected) for m in measures), (expected, measures)
    assert all(row["value"] for row in results["rows"])
    for row in results["rows"]:
        assert row["measure"] in result.stdout  # the table is printed too
    assert not (tmp_path / "RESULTS.md").exists()  # smoke numbers never overwrite the report


def smoke_rows(section: str, results: str, out: Path, timeout: float) -> list[list[str]]:
    """`python -m bench SECTION --smoke` into ``out``: the rows of its results/<results>.json."""
    result = run_bench(section, "--smoke", "--out", str(out), cwd=out, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "results" / f"{results}.json").read_text())["rows"]


@pytest.mark.slow
def test_decode_bench_smoke_produces_every_row(tmp_path: Path) -> None:
    rows = smoke_rows("decode", "decoding", tmp_path, timeout=600)
    measures = [row[0] for row in rows]
    for kind in ("28x28 grey PNG", "128x128 RGB JPEG"):
        for expected in (
            "Pillow tight loop",
            "process_data vs decode limit",
            "process_data vs Pillow-only process_data",
        ):
            assert f"{kind}: {expected}" in " ".join(measures), (kind, expected, measures)
    fast = {"28x28 grey PNG": "pyspng", "128x128 RGB JPEG": "simplejpeg"}
    for kind, decoder in fast.items():
        row = next(r for r in rows if r[0].startswith(f"{kind}: {decoder} tight loop"))
        assert "identical to Pillow" in row[1], row
    for size in ("500x375", "2000x1500"):  # photos resized down to 224x224
        photo = f"{size} RGB JPEG photo to 224x224: process_data vs limit for the same output"
        assert photo in measures, measures
    assert not (tmp_path / "RESULTS.md").exists()  # smoke numbers never overwrite the report


@pytest.mark.slow
def test_models_bench_smoke_produces_every_row(tmp_path: Path) -> None:
    rows = smoke_rows("models", "models", tmp_path, timeout=600)
    measures = " ".join(row[0] for row in rows)
    for expected in (
        "augment=basic, per batch",
        "augment=strong, per batch",
        "convnet: samples/s augment=basic / none",
        "tf_efficientnet_lite0: samples/s augment=basic / none",
        "tf_efficientnet_lite0 epoch: stage / bare loop",
    ):
        assert expected in measures, (expected, measures)
    assert not (tmp_path / "RESULTS.md").exists()  # smoke numbers never overwrite the report


@pytest.mark.slow
def test_predict_bench_smoke_produces_every_row(tmp_path: Path) -> None:
    rows = smoke_rows("predict", "predict", tmp_path, timeout=900)
    measures = " ".join(row[0] for row in rows)
    for expected in (
        *(
            f"{name} / {baseline}, {size}x{size}"
            for name in (
                "imgpipe predict (make predict, start-up included)",
                "predict_folder (the stage's work, no start-up)",
            )
            for baseline in ("bare loop", "one image at a time")
            for size in (28, 8)
        ),
        "imgpipe predict's fixed cost (its seconds less the stage's), 8x8",
        "make serve: process start to /ready 200",
        "make serve, 1 client, keep-alive: /predict p50 / p99",
        "make serve, 8 clients: /predict / /health (no-op) requests/s",
        "make train on the sample, new MLflow store: tracking on the training thread",
        "make train on the sample, existing store: tracking on the training thread",
    ):
        assert expected in measures, (expected, measures)
    assert "MODEL NOT LOGGED" not in measures  # each run ended FINISHED with its model
    assert not (tmp_path / "RESULTS.md").exists()  # smoke numbers never overwrite the report


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@pytest.mark.slow
def test_sweep_bench_smoke_produces_every_row_and_leaves_the_report_alone(tmp_path: Path) -> None:
    report = [REPO / "bench" / "RESULTS.md", REPO / "bench" / "results" / "sweep.json"]
    before = [_digest(p) for p in report]
    rows = smoke_rows("sweep", "sweep-smoke", tmp_path, timeout=600)
    measures = [row[0] for row in rows]
    replayed = "replay, 2,000 random sweeps over 4 of these curves"
    for expected in (
        "spread of final val accuracy (unpruned trials, SD)",
        "epochs, pruned / unpruned",
        "epochs to target, pruned / unpruned",
        "time to target, pruned / unpruned",
        "2 workers / 1 worker wall time",
        f"{replayed}: epochs to target, pruned / unpruned (median)",
        f"{replayed}, a judge that is never wrong at the rule's moments (start-up trials 3, "
        "warm-up epochs 1): median ratio / sweeps at <= 0.6x",
        f"{replayed}, a judge that is never wrong at the rule's moments (start-up trials 1, "
        "warm-up epochs 1): median ratio / sweeps at <= 0.6x",
    ):
        assert expected in measures, (expected, measures)
    assert "## Sweeps: pruning and workers" in (tmp_path / "smoke.md").read_text()
    # Smoke numbers never reach the report, nor the records --replay reads.
    assert not (tmp_path / "RESULTS.md").exists()
    assert [_digest(p) for p in report] == before

    # --replay redoes a recorded full run's rows into the report beside it; with none,
    # it says so in one line.
    refused = run_bench("sweep", "--replay", "--out", str(tmp_path), cwd=tmp_path)
    assert (refused.returncode, refused.stderr.strip()) == (
        1,
        f"error: {tmp_path / 'results' / 'sweep.json'}: no recorded sweeps to replay "
        "(run python -m bench sweep first)",
    )
    (tmp_path / "results" / "sweep-smoke.json").rename(tmp_path / "results" / "sweep.json")
    redone = run_bench("sweep", "--replay", "--out", str(tmp_path), cwd=tmp_path)
    assert redone.returncode == 0, redone.stderr
    written = (tmp_path / "RESULTS.md").read_text()
    for measure, value, _, _ in rows:
        if measure.startswith("replay"):
            assert f"| {measure} | {value} |" in written  # the same draws, the same rows
    assert [_digest(p) for p in report] == before


def test_a_judge_that_is_never_wrong_is_the_bound_of_the_median_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from bench.sweep import perfect_judge, replay_sweep

    bad, good = [0.1] * 8, [0.3, 0.5, 0.7, 0.9, 0.95, 0.95, 0.95, 0.96]
    # 3 start-up trials run whole (24 epochs), the next two bad ones stop after epoch 2.
    assert perfect_judge([bad, bad, bad, bad, bad, good], 150, 3, 1) == (48, 24 + 4 + 8, 6)
    # A good first trial: nothing to save, for the judge or the rule.
    assert perfect_judge([good, bad], 150, 1, 1) == replay_sweep([good, bad], 150, 1, 1)
    rng = random.Random(0)
    curves = [
        [min(1.0, top * (e + 1) / 8 + rng.random() / 20) for e in range(8)]
        for top in [rng.choice((0.1, 0.4, 0.7, 0.97)) for _ in range(30)]
    ]
    for _ in range(300):
        order = [rng.choice(curves) for _ in range(20)]
        for startup, warmup in ((1, 1), (3, 1), (3, 0), (5, 2)):
            plain, pruned, first = replay_sweep(order, 150, startup, warmup)
            assert perfect_judge(order, 150, startup, warmup)[::2] == (plain, first)
            assert perfect_judge(order, 150, startup, warmup)[1] <= pruned
