"""The benchmark harness produces every row (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_smoke_produces_every_row(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
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


def test_decode_bench_smoke_produces_every_row(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "decode.py"), "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "decoding.json").read_text())["rows"]
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
    assert not (tmp_path / "RESULTS.md").exists()  # smoke numbers never overwrite the report
