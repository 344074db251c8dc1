"""The main table's targets and rows: each target declared once (the text in the table and
the check come from it), and the raw numbers of bench/runs.py turned into rows."""

from __future__ import annotations

import operator
from dataclasses import dataclass

COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt}


@dataclass(frozen=True)
class Target:
    """A row's target, declared once: the text in the table and the check come from it."""

    op: str  # a key of COMPARISONS
    limit: float
    unit: str = ""  # "x", "s", or "%" (``limit`` is then a fraction: 0.02 reads "2%")
    gpu_only: bool = False  # judged on a GPU; on a CPU the row only reports

    def __str__(self) -> str:
        shown = f"{self.limit * 100:g}%" if self.unit == "%" else f"{self.limit:g}{self.unit}"
        return f"{self.op} {shown}" + (" on GPU (CPU: report)" if self.gpu_only else "")

    def status(self, measured: float, device: str) -> str:
        if self.gpu_only and not device.startswith("cuda"):
            return "-"
        return "met" if COMPARISONS[self.op](measured, self.limit) else "MISSED"


def judged(
    measure: str, value: str, target: Target, measured: float, device: str = "cpu"
) -> tuple[str, str, str, str]:
    """A table row whose status is ``measured`` held against ``target`` on ``device``."""
    return measure, value, str(target), target.status(measured, device)


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    p, t, k, s, u = r["processing"], r["training"], r["tracking"], r["sweep"], r["startup"]
    base = k["off_total_s"]

    def overhead(mode: str) -> tuple[float, str]:
        """Tracking seconds a run pays over MLflow off (dvclive is on in both), as a share
        of the training, and the text of the row."""
        extra = (k[f"{mode}_tracking_s"] - k["off_tracking_s"]) + (
            k[f"{mode}_tracking_background_cpu_s"] - k["off_tracking_background_cpu_s"]
        )
        wall = k[f"{mode}_total_s"] - base
        text = (
            f"+{extra:.2f}s = {extra / base:.1%} of a {base:.1f}s training "
            f"(2% from {extra / 0.02:.0f}s of training); best wall times {wall:+.2f}s"
        )
        if f"{mode}_round_trip_ms" in k:
            text += f"; {k[f'{mode}_round_trip_ms']:.1f} ms a request"
        return extra / base, text

    _, sqlite_text = overhead("sqlite")
    server_share, server_text = overhead("server")
    _, default_text = overhead("server-default")
    device = t.get("device", "cpu")
    vs_limit = p["pipeline_ips"] / p["decode_limit_ips"]
    vs_naive = p["pipeline_ips"] / p["naive_ips"]
    vs_bare = t["bare_sps"] / t["real_sps"]
    vs_per_item = t["real_sps"] / t["per_item_sps"]
    sweep_speedup = s["w2_trials_per_hour"] / s["w1_trials_per_hour"]

    return [
        judged(
            "process_data vs decode limit",
            f"{p['pipeline_ips']:,.0f} vs {p['decode_limit_ips']:,.0f} img/s = {vs_limit:.2f}x",
            Target(">=", 0.75, "x"),
            vs_limit,
        ),
        judged(
            "process_data vs naive per-image",
            f"{p['pipeline_ips']:,.0f} vs {p['naive_ips']:,.0f} img/s = {vs_naive:.1f}x",
            Target(">=", 10, "x"),
            vs_naive,
        ),
        (
            f"process_data peak memory ({p['images']:,} images)",
            f"{p['peak_pss_mb']:,.0f} MB PSS ({p['peak_rss_mb']:,.0f} MB summed RSS)",
            "flat",
            "-",
        ),
        judged(
            f"train epoch time vs bare loop ({device})",
            f"{t['real_sps']:,.0f} vs {t['bare_sps']:,.0f} samples/s = {vs_bare:.3f}x time"
            f" (best of {t['repeats']}; pairs {t['pair_ratio_min']:.2f}-{t['pair_ratio_max']:.2f}x)",
            Target("<=", 1.05, "x"),
            vs_bare,
        ),
        judged(
            f"train vs per-item PNG DataLoader ({device})",
            f"{t['real_sps']:,.0f} vs {t['per_item_sps']:,.0f} samples/s = {vs_per_item:.2f}x",
            Target(">=", 3, "x", gpu_only=True),
            vs_per_item,
            device,
        ),
        ("tracking overhead, SQLite store", sqlite_text, "-", "-"),
        judged(
            "tracking overhead, mlflow server (make mlflow-server: 1 worker)",
            server_text,
            Target("<=", 0.02, "%"),
            server_share,
        ),
        ("tracking overhead, mlflow server (default: 4 workers)", default_text, "-", "-"),
        (
            "tracking cost of a fresh process (imports, store, model export)",
            f"+{u['fresh_tracking_s']:.2f}s on the training thread, "
            f"{u['fresh_tracking_background_cpu_s']:.2f}s CPU in the background",
            "-",
            "-",
        ),
        judged(
            "sweep per-trial overhead (1 worker)",
            f"{s['w1_trial_overhead_s']:.2f}s",
            Target("<=", 0.5, "s"),
            s["w1_trial_overhead_s"],
        ),
        judged(
            "sweep trials/hour, 1 vs 2 workers",
            f"{s['w1_trials_per_hour']:,.0f} vs {s['w2_trials_per_hour']:,.0f} = {sweep_speedup:.2f}x",
            Target(">", 1, "x"),
            sweep_speedup,
        ),
        judged(
            "no-op dvc repro", f"{u['noop_repro_s']:.2f}s", Target("<=", 1, "s"), u["noop_repro_s"]
        ),
        judged(
            "entry point to first training step",
            f"{u['first_step_s']:.2f}s",
            Target("<=", 3, "s"),
            u["first_step_s"],
        ),
    ]
