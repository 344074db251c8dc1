"""The main table's report: printed, and written as the top of bench/RESULTS.md.

RESULTS.md holds tables only: the main table here, then each topic section
(bench/sections.py) kept as it was. The reasoning behind the rows lives in bench/NOTES.md,
written once and linked, never pasted in.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import sections
from imgpipe.atomic import write_text_atomic

Row = tuple[str, str, str, str]


def print_table(results: dict, table: list[Row]) -> None:
    width = max(len(r[0]) for r in table)
    print(f"\n{results['machine']}\n")
    for name, value, target, state in table:
        print(f"{name:<{width}}  {value:<70}  {target:<24}  {state}")


def write_markdown(results: dict, table: list[Row], path: Path) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Measured {results['date']} with `make bench` ({results['seconds']:.0f} s) on: {results['machine']}.",
        f"Arguments: `{json.dumps(results['args'])}`.",
        "Why a target is missed and what the figures mean: bench/NOTES.md.",
        "",
        "| measure | value | target | status |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table),
        "",
    ]
    # The topic benchmarks' sections (bench/sections.py) are kept as they were.
    kept = sections.sections(path.read_text()) if path.is_file() else {}
    lines += [block + "\n" for block in kept.values()]
    write_text_atomic(path, "\n".join(lines))
