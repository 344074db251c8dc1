"""The documentation: the MkDocs site builds with --strict (a broken link, a page left out of
the nav or a missing include fails), the README stays a front page whose links all resolve,
and the benchmark tables in the site are bench/RESULTS.md itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from imgpipe.testing import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_docs_site_builds_strict_and_offline(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = tmp_path / "site"
    for page in sorted((REPO / "docs").glob("*.md")):
        built = site / "index.html" if page.stem == "index" else site / page.stem / "index.html"
        assert built.is_file(), f"{page.name} was not built"
    # The per-platform tabs and admonitions render (the extensions are on), and the
    # benchmark page carries RESULTS.md's tables, not a copy that could drift.
    assert "tabbed-set" in (site / "containers" / "index.html").read_text()
    benchmarks = (site / "benchmarks" / "index.html").read_text()
    lines = (REPO / "bench" / "RESULTS.md").read_text().splitlines()
    first_row = lines[next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1]
    measure = first_row.split("|")[1].strip()
    assert measure.replace("`", "") and measure.split("`")[0] in benchmarks, measure
    # Nothing the pages load comes from the network (no web fonts, no CDN scripts).
    for html in site.rglob("*.html"):
        assert "fonts.googleapis" not in html.read_text(), html


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make run" in text and "make test" in text
    targets = LINK.findall(text)
    assert any(t.startswith("docs/images/") for t in targets), "the README has a picture"
    for target in targets:
        if re.match(r"[a-z]+://", target):
            continue
        path = target.split("#", 1)[0]
        assert (REPO / path).exists(), f"README links to missing {target}"
    # Every page of the site is reachable from the README's map.
    for page in (REPO / "docs").glob("*.md"):
        if page.name != "index.md":
            assert f"docs/{page.name}" in targets, f"README's map lacks docs/{page.name}"
