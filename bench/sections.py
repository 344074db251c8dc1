"""Rows measured by the topic benchmarks (bench/<topic>.py) beside the main table.

Each topic script measures on its own schedule (the GPU rows only on a CUDA machine,
the large streaming runs only when asked) and owns one section of RESULTS.md between
two markers, so rewriting one section, or the main table (bench/pipeline.py), keeps the
others. Its raw numbers go to bench/results/<topic>.json (not committed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from imgpipe.atomic import write_text_atomic

BENCH = Path(__file__).resolve().parent
RESULTS_MD = BENCH / "RESULTS.md"
RESULTS_DIR = BENCH / "results"

Row = tuple[str, str, str, str]  # measure, value, target, status


def _markers(topic: str) -> tuple[str, str]:
    return f"<!-- bench:{topic}:begin -->", f"<!-- bench:{topic}:end -->"


def render(topic: str, title: str, intro: str, rows: list[Row]) -> str:
    begin, end = _markers(topic)
    lines = [begin, f"## {title}", "", intro, "", "| measure | value | target | status |"]
    lines += ["|---|---|---|---|", *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows), end]
    return "\n".join(lines)


def sections(text: str) -> dict[str, str]:
    """Every topic section in ``text``, by topic, markers included."""
    found = re.finditer(r"<!-- bench:([\w-]+):begin -->.*?<!-- bench:\1:end -->", text, re.S)
    return {m.group(1): m.group(0) for m in found}


def write_section(
    topic: str, title: str, intro: str, rows: list[Row], data: dict, path: Path = RESULTS_MD
) -> None:
    """Replace (or append) ``topic``'s section of RESULTS.md and save its raw numbers."""
    block = render(topic, title, intro, rows)
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    old = sections(text).get(topic)
    text = text.replace(old, block) if old else text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)
    out = path.parent / "results" / f"{topic}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps({"rows": rows, **data}, indent=2) + "\n")
