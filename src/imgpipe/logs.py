"""``setup_logging(log_dir)``: conf/logging.yaml, JSON lines in rotating files, readable console."""

from __future__ import annotations

import logging.config
import os
from pathlib import Path

import yaml


def setup_logging(
    log_dir: str | os.PathLike[str], config_path: str | os.PathLike[str] | None = None
) -> Path:
    """Configure logging from ``conf/logging.yaml``; file handlers write inside ``log_dir``.

    Returns the log directory. Handler file names in the YAML are relative to it.
    """
    if config_path is None:
        from imgpipe.config import conf_dir

        config_path = conf_dir() / "logging.yaml"
    with open(config_path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for handler in config.get("handlers", {}).values():
        if "filename" in handler:
            handler["filename"] = str(directory / handler["filename"])
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    return directory
