"""`python -m bench [SECTION] [options]`: runs one section (bench/<SECTION>.py); without a
section name, the main table (options starting with '-' go to it: `python -m bench --smoke`)."""

from __future__ import annotations

import importlib
import sys

from bench import DEFAULT, SECTIONS


def main(argv: list[str]) -> int:
    if argv[:1] == ["--list"]:
        width = max(map(len, SECTIONS))
        for name, what in SECTIONS.items():
            print(f"{name:<{width}}  {what}")
        return 0
    name, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else (DEFAULT, argv)
    if name not in SECTIONS:
        print(
            f"error: unknown benchmark section {name!r}; sections: {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    section = importlib.import_module(f"bench.{name}")
    return section.main(rest) or 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
