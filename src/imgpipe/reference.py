"""docs/configuration.md, generated from the schema (``imgpipe config reference``)."""

from __future__ import annotations


def configuration_reference() -> str:
    """The page's Markdown text."""
    return "# Configuration reference\n"
