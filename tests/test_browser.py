"""What users look at, in a real headless browser: the offline plots page, the MLflow UI
over runs the pipeline just logged, and the Optuna dashboard over the sweep's study.

Debian's chromium driven by Playwright for Python (Playwright's own browser download needs
hosts CI cannot reach). Every request that is not to 127.0.0.1, localhost or a local file is
aborted and counted, so a page that only works online fails here. Each test leaves a
screenshot in its temp folder (``<name>.png``), taken also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from helpers import IN_CI, error_lines
from imgpipe import testing
from imgpipe.plots import plot_files
from imgpipe.testing import copy_project, free_port, make, project_env

pytestmark = pytest.mark.slow

EPOCHS = 2
TRIALS = 2
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


# Debian's package names it chromium; GitHub's Ubuntu runners carry a Chromium build as
# chromium-browser and Google Chrome. CHROMIUM names another one.
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium_or_skip() -> str:
    found = (shutil.which(name) for name in BROWSERS)
    path = os.environ.get("CHROMIUM") or next((p for p in found if p), None)
    if path is None:
        reason = (
            "Debian's chromium is not installed (.ci/run installs it): apt-get install chromium"
        )
        if IN_CI:
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Traffic:
    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def open_page(browser, shot: Path) -> Iterator[tuple[object, Traffic]]:
    """A page that may reach only this machine; its screenshot lands at ``shot``."""
    traffic = Traffic()
    page = browser.new_page(viewport={"width": 1400, "height": 900})

    def route(r) -> None:
        url = urlsplit(r.request.url)
        if url.scheme in ("file", "data", "blob") or url.hostname in LOCAL_HOSTS:
            r.continue_()
        else:
            traffic.blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("requestfailed", lambda r: traffic.failed.append(f"{r.url}: {r.failure}"))
    page.on("pageerror", lambda exc: traffic.errors.append(str(exc)))
    try:
        yield page, traffic
    finally:
        with contextlib.suppress(Exception):  # the screenshot must not hide the failure
            page.screenshot(path=str(shot), full_page=True)
        page.close()


# --------------------------------------------------------------------------- a filled project


@dataclass(frozen=True)
class Filled:
    project: Path
    server: str
    train_run: str
    parent_run: str
    trial_runs: dict[str, str]  # run name -> id
    experiment_id: str


@pytest.fixture(scope="module")
def filled(sample_processed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    """A project copy the pipeline just filled: a tiny training (train(), its dvclive in the
    project) and a tiny sweep (`make sweep`), both tracked by one real `mlflow server`."""
    from mlflow import MlflowClient

    from imgpipe.train import train

    root = tmp_path_factory.mktemp("browser")
    project = copy_project(root / "project")
    with testing.mlflow_server(root / "server") as server:
        cfg = testing.train_config(
            sample_processed,
            root / "train",
            epochs=EPOCHS,
            mlflow_tracking_uri=server.url,
            live_dir_path=str(project / "dvclive"),
        )
        result = train(cfg)
        args = (
            f"data_dir_path={sample_processed} epochs=1 hydra.sweeper.n_trials={TRIALS} "
            f"mlflow_tracking_uri={server.url} log_dir={root / 'logs'}"
        )
        swept = make("sweep", project, f"ARGS={args}")
        assert swept.returncode == 0, swept.stderr[-3000:]
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name(cfg.mlflow_exp_name)
        runs = client.search_runs([experiment.experiment_id])
        parent = [r for r in runs if r.info.run_name.startswith("sweep-")]
        assert len(parent) == 1, [r.info.run_name for r in runs]
        trials = {
            r.info.run_name: r.info.run_id
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id
        }
        assert len(trials) == TRIALS, trials
        yield Filled(
            project,
            server.url,
            result.run_id,
            parent[0].info.run_id,
            trials,
            experiment.experiment_id,
        )


# --------------------------------------------------------------------------- the plots page


def test_make_plots_page_draws_every_plot_with_no_network(
    filled: Filled, browser, tmp_path: Path
) -> None:
    done = make("plots", filled.project)
    assert done.returncode == 0, done.stderr
    # The predict stage has not run here: its plot is said to wait for `make predict`.
    assert "predictions/confusion_matrix.json not drawn: run `make predict` first" in done.stderr
    page_file = filled.project / "dvc_plots" / "index.html"
    assert f"plots: {page_file}" in done.stdout
    html = page_file.read_text()
    assert "cdn.jsdelivr.net" not in html and '<script src="vega.js">' in html
    # The static images of the same plots, drawn at the end of training.
    static = filled.project / "dvclive" / "plots" / "static"
    for name in ("loss", "accuracy", "confusion_matrix"):
        assert (static / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # ... but not for sweep trials, whose dvclive folders nobody opens
    trials = list((filled.project / "sweep" / "study").glob("*/trials/*/dvclive"))
    assert len(trials) == TRIALS and not any((t / "plots" / "static").exists() for t in trials)

    with open_page(browser, tmp_path / "plots.png") as (page, traffic):
        page.goto(page_file.as_uri())
        charts = page.locator(".vega-embed")
        entries = yaml.safe_load((filled.project / "dvc.yaml").read_text())["plots"]
        plots = len(entries)
        waiting = {i for i, entry in enumerate(entries) if "predictions/" in str(entry)}
        page.wait_for_function(
            f"document.querySelectorAll('.vega-embed svg, .vega-embed canvas').length >= {plots}",
            timeout=30_000,
        )
        assert charts.count() == plots
        # each chart drew marks, not just its frame
        for i in set(range(plots)) - waiting:
            assert charts.nth(i).locator("path, rect").count() > 10, i
        assert traffic.blocked == [] and traffic.failed == [] and traffic.errors == [], traffic


def test_make_plots_with_a_plot_missing_is_one_line_and_keeps_the_old_page(
    filled: Filled, tmp_path: Path
) -> None:
    project = copy_project(tmp_path / "project")
    shutil.rmtree(project / "dvclive")
    shutil.copytree(filled.project / "dvclive", project / "dvclive")
    first = make("plots", project)
    assert first.returncode == 0, first.stderr
    page = project / "dvc_plots" / "index.html"
    before = page.read_bytes()
    missing = plot_files(project)[0]
    (project / missing).unlink()
    result = make("plots", project)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        f"error: {missing} (a plot in dvc.yaml) is missing: train first (`make train`)"
    ], result.stderr
    assert "Traceback" not in result.stderr
    assert page.read_bytes() == before
    assert sorted(p.name for p in page.parent.iterdir()) == ["index.html", "vega.js"]


# --------------------------------------------------------------------------- MLflow UI


def test_mlflow_ui_shows_the_experiment_the_train_run_its_chart_and_the_sweep(
    filled: Filled, browser, tmp_path: Path
) -> None:
    base = f"{filled.server}/#/experiments/{filled.experiment_id}"
    with open_page(browser, tmp_path / "mlflow-runs.png") as (page, traffic):
        page.goto(f"{base}/runs")
        parent = page.get_by_role("row").filter(has_text="sweep-")
        parent.wait_for(timeout=60_000)
        assert page.get_by_role("row").filter(has_text="train").count() >= 1
        for name in filled.trial_runs:  # children are folded under their parent
            assert page.get_by_role("row").filter(has_text=name).count() == 0
        parent.get_by_role("button").first.click()
        for name in filled.trial_runs:
            page.get_by_role("row").filter(has_text=name).wait_for(timeout=30_000)
        assert traffic.blocked == [] and traffic.errors == [], traffic

    with open_page(browser, tmp_path / "mlflow-train-metrics.png") as (page, traffic):
        page.goto(f"{base}/runs/{filled.train_run}/model-metrics")
        page.wait_for_function(
            "document.querySelectorAll('.js-plotly-plot path.js-line').length >= 2",
            timeout=60_000,
        )
        assert page.get_by_text("train/loss").count() >= 1
        lines = page.locator(".js-plotly-plot path.js-line")
        # a curve through every epoch: EPOCHS points, EPOCHS - 1 segments
        segments = [
            (lines.nth(i).get_attribute("d") or "").count("L") for i in range(lines.count())
        ]
        assert EPOCHS - 1 in segments, segments
        assert traffic.blocked == [] and traffic.errors == [], traffic


# --------------------------------------------------------------------------- Optuna dashboard


@contextlib.contextmanager
def dashboard(project: Path, port: int) -> Iterator[subprocess.Popen]:
    """`make dashboard` on ``port``; the whole process group is stopped on exit."""
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "dashboard"],
        cwd=project,
        env=project_env({"DASHBOARD_PORT": str(port)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_url(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read() if proc.poll() is not None else ""
            raise AssertionError(f"{url} never answered: {out[-2000:]}")
        time.sleep(0.3)


def test_make_dashboard_shows_the_sweeps_trials(filled: Filled, browser, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with dashboard(filled.project, port) as proc:
        wait_for_url(f"{url}/api/studies", proc)
        with open_page(browser, tmp_path / "dashboard.png") as (page, traffic):
            page.goto(f"{url}/dashboard/")
            study = page.get_by_text("image-classification").first
            study.wait_for(timeout=30_000)
            study.click()
            page.get_by_text("Pareto Front").wait_for(timeout=30_000)
            page.goto(page.url.rstrip("/") + "/trials")
            for number in range(TRIALS):
                page.get_by_text(f"Trial {number}").first.wait_for(timeout=30_000)
            assert page.get_by_text(f"Trial {TRIALS}").count() == 0
            assert traffic.blocked == [] and traffic.errors == [], traffic
    out = proc.stdout.read()
    assert f"http://127.0.0.1:{port}/dashboard/" in out, out


def test_make_dashboard_without_a_study_is_one_line(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    result = make("dashboard", project, env={"DASHBOARD_PORT": str(free_port())}, timeout=120)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: no study 'image-classification' yet")
    assert "make sweep" in lines[0] and "Traceback" not in result.stderr


def test_make_dashboard_on_a_taken_or_bad_port_is_one_line(filled: Filled) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = make("dashboard", filled.project, env={"DASHBOARD_PORT": str(port)}, timeout=120)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (set DASHBOARD_PORT)"
    ], result.stderr
    bad = make("dashboard", filled.project, env={"DASHBOARD_PORT": "80a"}, timeout=120)
    assert bad.returncode != 0
    assert error_lines(bad.stderr) == [
        "error: DASHBOARD_PORT='80a': expected a port number (1-65535)"
    ], bad.stderr
