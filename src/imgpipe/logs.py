"""``setup_logging(log_dir)``: conf/logging.yaml, JSON lines in rotating files, readable console."""

from __future__ import annotations

import logging
import logging.config
import os
import sys
from pathlib import Path

import yaml


def setup_logging(
    log_dir: str | os.PathLike[str], config_path: str | os.PathLike[str] | None = None
) -> Path:
    """Configure logging from ``conf/logging.yaml``; file handlers write inside ``log_dir``.

    Returns the log directory. Handler file names in the YAML are relative to it.
    A log folder that cannot be made or written raises ``PipelineError`` (the entry point
    prints its one line, exit status 2); a log file that stops taking lines later (a full
    disk) says so once and the run goes on.
    """
    if config_path is None:
        from imgpipe.config import conf_dir

        config_path = conf_dir() / "logging.yaml"
    with open(config_path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    directory = Path(log_dir)
    files = []
    for handler in config.get("handlers", {}).values():
        if "filename" in handler:
            handler["filename"] = str(directory / handler["filename"])
            files.append(handler["filename"])
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in files:  # what dictConfig would report as "Unable to configure handler"
            with open(name, "a", encoding="utf-8"):
                pass
    except OSError as exc:
        from imgpipe.atomic import write_error

        raise write_error(exc.filename or directory, exc) from None
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handleError = _warn_once(handler)  # type: ignore[method-assign]
    return directory


def _warn_once(handler: logging.FileHandler):
    """logging prints a traceback for every line a file handler fails to write."""
    warned = False

    def handle_error(record: logging.LogRecord) -> None:
        nonlocal warned
        if not warned:
            warned = True
            exc = sys.exc_info()[1]
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(
                f"warning: cannot write {handler.baseFilename}: {reason}; "
                "its further lines are dropped",
                file=sys.stderr,
                flush=True,
            )

    return handle_error
