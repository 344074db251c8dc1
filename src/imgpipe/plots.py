"""The plots users look at, drawn with no network.

    imgpipe plots page [OUT]          # `make plots`: OUT/index.html (default dvc_plots)
    imgpipe plots images LIVE_DIR     # static PNGs of a dvclive folder
    imgpipe plots readme DEST         # `make readme-images`: the README's pictures

``dvc plots show`` writes a page that loads Vega, Vega-Lite and Vega-Embed from a CDN, so
offline (clusters, CI) it stays blank. The page here is DVC's own, filled from dvc.yaml's
``plots:`` through ``--html-template``: the template loads ``vega.js`` from beside the page,
a self-contained bundle of the three libraries that vl-convert-python (a pinned dependency,
installed from the package registry) builds offline. The bundle is written next to the
page, not committed, and reused while vl-convert's version stays the same.

Static images of the same curves and the confusion matrix are drawn at the end of every
training (``LiveLog.end``), into ``<live dir>/plots/static/``: dvclive's plots folder is an
output of the train stage, so anything written there later (by ``make plots``, say) would
make DVC see the stage as changed and train again. They are drawn from the files dvclive
wrote (one chart per metric name, one line per prefix: ``train/loss`` and ``val/loss``
share the "loss" chart), so a renamed or added metric needs no change here; the cost is
measured in bench/NOTES.md (about 1 s, most of it starting vl-convert's Vega engine).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from imgpipe.atomic import atomic_dir, atomic_file
from imgpipe.errors import PipelineError

BUNDLE = "vega.js"
# DVC's plot templates are Vega-Lite 5 specs: the bundle carries that major version.
VEGA_LITE = "5.21"
STATIC_DIR = Path("plots") / "static"
PAGE_DIR = "dvc_plots"

# DVC fills {plot_divs} and {refresh_tag}; leaving out {scripts} is what keeps its CDN
# <script> tags off the page.
PAGE_TEMPLATE = """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  {refresh_tag}
  <title>imgpipe plots</title>
  <script src="vega.js"></script>
  <style>
    body { font-family: sans-serif; margin: 16px; }
    table { border-spacing: 15px; }
  </style>
</head>
<body>
  {plot_divs}
</body>
</html>
"""


# --------------------------------------------------------------------------- the offline page


def bundle_header() -> str:
    """The bundle's first line: which libraries it holds, so a stale one is rebuilt."""
    import vl_convert

    return (
        f"/* vega {vl_convert.get_vega_version()}, vega-lite {VEGA_LITE}, vega-embed "
        f"{vl_convert.get_vega_embed_version()}: built by vl-convert-python "
        f"{vl_convert.__version__} (imgpipe plots page) */\n"
    )


def bundle_text(reuse: Path | None = None) -> str:
    """The Vega + Vega-Lite + Vega-Embed bundle (about 0.9 MB, 1.3 s to build); ``reuse``
    is an earlier one, taken when it was built by the same vl-convert."""
    header = bundle_header()
    if reuse is not None and reuse.is_file():
        with open(reuse, encoding="utf-8") as fh:
            if fh.readline() == header:
                return header + fh.read()
    import vl_convert

    return header + vl_convert.javascript_bundle(vl_version=VEGA_LITE)


def write_page(project: Path, out: Path) -> Path:
    """``dvc plots show`` of ``project`` through the offline template into ``out``
    (replaced as a whole, only when DVC succeeds); the page's path.

    A plot whose file is missing waits, said in one line, when a stage of dvc.yaml that has
    not run here (its output is absent) writes it: the page is drawn without it, so the
    curves show before the later, optional stages (predict) have run. A missing file that a
    stage which ran should have written, or that no stage writes, is an error.
    """
    out = out if out.is_absolute() else project / out
    missing = [path for path in plot_files(project) if not (project / path).exists()]
    writers = stages_writing(project, missing) if missing else {}
    for path in missing:
        writer = writers.get(path)
        if writer is None:
            raise PipelineError(
                f"{path} (a plot in dvc.yaml) is missing, and no stage of dvc.yaml writes it"
            )
        if writer.ran:
            raise PipelineError(
                f"{path} (a plot in dvc.yaml) is missing: {writer.stage} first (`{writer.command}`)"
            )
    for path in missing:
        stage, command, _ = writers[path]
        print(
            f"{path} not drawn: run `{command}` first (stage {stage} has not run here)",
            file=sys.stderr,
        )
    dvc = Path(sys.executable).parent / "dvc"
    with atomic_dir(out) as tmp:
        template = tmp / ".template.html"
        template.write_text(PAGE_TEMPLATE, encoding="utf-8")
        (tmp / BUNDLE).write_text(bundle_text(out / BUNDLE), encoding="utf-8")
        proc = subprocess.run(
            [str(dvc if dvc.exists() else "dvc"), "plots", "show", "--html-template",
             str(template), "-o", str(tmp)],
            cwd=project, capture_output=True, text=True, check=False,
            env={**os.environ, "DVC_STUDIO_OFFLINE": "1"},
        )  # fmt: skip
        template.unlink()
        # DVC says it "failed to load" a plot whose file is missing, without naming it: with
        # a plot left out on purpose, that line is the one expected.
        failed = [
            ln for ln in proc.stderr.splitlines() if "failed to load" in ln.lower() and not missing
        ]
        if proc.returncode != 0 or not (tmp / "index.html").is_file() or failed:
            reason = (failed or proc.stderr.strip().splitlines() or ["no page written"])[-1]
            raise PipelineError(f"dvc plots show in {project}: {reason.strip()}")
    return out / "index.html"


class Writer(NamedTuple):
    stage: str  # as `dvc repro` addresses it
    command: str  # what runs it: the stage's own when it is one make target, else dvc repro
    ran: bool  # its output is here: the stage has run in this workspace


def stages_writing(project: Path, paths: list[str]) -> dict[str, Writer]:
    """Of ``paths`` (relative to ``project``), those that a stage of dvc.yaml declares among
    its outs (the file, or a folder above it), as DVC itself resolves them (``${...}`` from
    params.yaml), and the stage that writes each."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    wanted = {path: (project / path).resolve() for path in paths}
    found: dict[str, Writer] = {}
    try:
        with Repo(str(project)) as repo:
            stages = [stage for stage in repo.index.stages if stage.cmd]  # not .dvc files
            for stage in stages:
                for output in stage.outs:
                    where = Path(output.fs_path).resolve()
                    for path, file in wanted.items():
                        if path not in found and file.is_relative_to(where):
                            found[path] = Writer(stage.addressing, _command(stage), where.exists())
    except DvcException as exc:
        raise PipelineError(f"{project / 'dvc.yaml'}: {str(exc).splitlines()[0]}") from None
    return found


def _command(stage) -> str:
    cmd = stage.cmd.strip() if isinstance(stage.cmd, str) else ""
    if re.fullmatch(r"make [\w.-]+", cmd):
        return cmd
    return f"dvc repro {stage.addressing}"


def plot_files(project: Path) -> list[str]:
    """The data files dvc.yaml's top-level ``plots:`` draw (DVC's own syntax: a plot is
    a file, or names its files as the keys of ``y``)."""
    import yaml

    dvc_yaml = project / "dvc.yaml"
    try:
        with open(dvc_yaml, encoding="utf-8") as fh:
            plots = (yaml.safe_load(fh) or {}).get("plots") or []
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"{dvc_yaml}: {str(exc).splitlines()[0]}") from None
    files: list[str] = []
    for entry in plots:
        for key, spec in entry.items() if isinstance(entry, dict) else [(entry, None)]:
            y = spec.get("y") if isinstance(spec, dict) else None
            files += list(y) if isinstance(y, dict) else [key]
    return files


# --------------------------------------------------------------------------- static images


def metric_series(live_dir: Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """dvclive's per-step metric files grouped by metric name: {"loss": {"train": [...],
    "val": [...]}}; a metric without a prefix is its own series."""
    root = live_dir / "plots" / "metrics"
    charts: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for tsv in sorted(root.rglob("*.tsv")):
        name = tsv.stem
        series = tsv.parent.relative_to(root).as_posix()
        with open(tsv, encoding="utf-8", newline="") as fh:
            rows = [(float(r["step"]), float(r[name])) for r in csv.DictReader(fh, delimiter="\t")]
        charts.setdefault(name, {})[series if series != "." else name] = rows
    return charts


def curve_spec(name: str, series: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    values = [{"epoch": s, name: v, "split": k} for k, rows in series.items() for s, v in rows]
    return {
        "$schema": f"https://vega.github.io/schema/vega-lite/v{VEGA_LITE.split('.')[0]}.json",
        "title": name,
        "width": 320,
        "height": 200,
        "data": {"values": values},
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": "epoch", "type": "quantitative", "axis": {"tickMinStep": 1}},
            "y": {"field": name, "type": "quantitative", "scale": {"zero": False}},
            "color": {"field": "split", "type": "nominal"},
        },
    }


def confusion_spec(title: str, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of (actual, predicted) as a heat map with the numbers written in."""
    count = {"field": "n", "type": "quantitative"}
    return {
        "$schema": f"https://vega.github.io/schema/vega-lite/v{VEGA_LITE.split('.')[0]}.json",
        "title": title,
        "data": {"values": pairs},
        "transform": [
            {"aggregate": [{"op": "count", "as": "n"}], "groupby": ["actual", "predicted"]},
            {"joinaggregate": [{"op": "max", "field": "n", "as": "most"}]},
        ],
        "encoding": {
            "x": {"field": "predicted", "type": "nominal"},
            "y": {"field": "actual", "type": "nominal"},
        },
        "layer": [
            {"mark": "rect", "encoding": {"color": count | {"legend": None}}},
            {
                "mark": {"type": "text", "fontSize": 9},
                "encoding": {
                    "text": count,
                    # light digits on the dark cells
                    "color": {
                        "condition": {"test": "datum.n > datum.most / 2", "value": "white"},
                        "value": "black",
                    },
                },
            },
        ],
    }


def static_specs(live_dir: Path) -> dict[str, dict[str, Any]]:
    """Every chart of a dvclive folder, by the file name it is drawn to (without .png)."""
    specs = {name: curve_spec(name, series) for name, series in metric_series(live_dir).items()}
    for path in sorted((live_dir / "plots" / "sklearn").glob("*.json")):
        with open(path, encoding="utf-8") as fh:
            pairs = json.load(fh)
        if isinstance(pairs, list) and pairs and {"actual", "predicted"} <= set(pairs[0]):
            specs[path.stem] = confusion_spec(path.stem.replace("_", " "), pairs)
    return specs


def warm_up_renderer() -> None:
    """Start vl-convert's Vega engine with a one-point chart: its first render starts the
    engine, the later ones reuse it (any thread)."""
    import vl_convert

    spec = {
        "data": {"values": [{"x": 0}]},
        "mark": "point",
        "encoding": {"x": {"field": "x", "type": "quantitative"}},
    }
    vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE, scale=1)


def draw_images(live_dir: str | os.PathLike[str]) -> list[Path]:
    """PNGs of the curves and the confusion matrix into ``<live_dir>/plots/static``
    (vl-convert renders Vega-Lite in-process: no browser, no network)."""
    import vl_convert

    live_dir = Path(live_dir)
    written = []
    for name, spec in static_specs(live_dir).items():
        png = vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE, scale=1)
        target = live_dir / STATIC_DIR / f"{name}.png"
        with atomic_file(target) as fh:
            fh.write(png)
        written.append(target)
    return written


# --------------------------------------------------------------------------- README pictures


README_SOURCES = {
    "loss.png": Path("dvclive") / STATIC_DIR / "loss.png",
    "accuracy.png": Path("dvclive") / STATIC_DIR / "accuracy.png",
    "confusion_matrix.png": Path("dvclive") / STATIC_DIR / "confusion_matrix.png",
    "pareto_front.png": Path("sweep") / "results" / "pareto_front.png",
}
README_MAX_BYTES = 60_000


def copy_readme_images(project: Path, dest: Path, sources: Iterable[str] = README_SOURCES) -> None:
    """The pipeline's own pictures of the sample data into ``dest`` (docs/images)."""
    dest = dest if dest.is_absolute() else project / dest
    for name in sources:
        src = project / README_SOURCES[name]
        if not src.is_file():
            raise PipelineError(f"{src}: missing (run the pipeline first: `make run`)")
        size = src.stat().st_size
        if size > README_MAX_BYTES:
            raise PipelineError(f"{src}: {size} bytes, above {README_MAX_BYTES} for the README")
        with atomic_file(dest / name) as fh, open(src, "rb") as data:
            shutil.copyfileobj(data, fh)
