"""``imgpipe sync``, ``imgpipe register``, ``imgpipe promote``: a run completed from its
checkpoint after a tracking outage, and the model registry by hand.

    imgpipe sync models [--tracking-uri URL]    # `make mlflow-sync`
    imgpipe promote --run RUN_ID                # `make promote RUN=...`: alias champion moves
    imgpipe promote --version 3                 # `make promote VERSION=3`
    imgpipe register --run RUN_ID               # a version; no alias moves

A password goes in the environment, never on a command line: MLFLOW_TRACKING_URI (the URL
with it), or MLFLOW_TRACKING_USERNAME/_PASSWORD.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from imgpipe.errors import PipelineError

TRACKING_URI = click.option(
    "--tracking-uri", help="the MLflow server or store (default: the config's, else the project's)"
)
NAME = click.option("--name", help="the registered model (default: mlflow_registered_model_name)")


@click.command()
@click.argument("checkpoint_dir", type=click.Path(file_okay=False))
@TRACKING_URI
def sync(checkpoint_dir: str, tracking_uri: str | None) -> None:
    """Log what the MLflow run of CHECKPOINT_DIR lacks (after an outage); run it twice, nothing
    is logged twice."""
    from imgpipe.tracking.sync import sync as complete_run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(complete_run(checkpoint_dir, tracking_uri), flush=True)


@click.command()
@click.option("--run", "run_id", help="an MLflow run id: its model (registered if not yet)")
@click.option("--version", "number", help="a version of the registered model")
@NAME
@TRACKING_URI
def promote(run_id: str | None, number: str | None, name: str | None, tracking_uri: str | None):
    """Move the alias 'champion' to a run's model or a version (the one it replaces becomes
    'previous')."""
    if (run_id is None) == (number is None):
        raise PipelineError("promote takes one of RUN=<run id> or VERSION=<n>")
    if number is not None and not number.isdigit():
        raise PipelineError(f"VERSION={number!r}: not a version number")
    _registry_action("promote", run_id, None if number is None else int(number), name, tracking_uri)


@click.command()
@click.option("--run", "run_id", required=True, help="the MLflow run whose model to register")
@NAME
@TRACKING_URI
def register(run_id: str, name: str | None, tracking_uri: str | None) -> None:
    """Register a run's model as a version of the registered model; no alias moves."""
    _registry_action("register", run_id, None, name, tracking_uri)


def _registry_action(
    action: str, run_id: str | None, number: int | None, name: str | None, uri: str | None
) -> Any:
    from imgpipe.tracking import registry

    _result_lines(registry.log)
    name, uri = _registry_target(name, uri)
    return registry.run_action(action, uri, name, run_id=run_id, number=number)


def _registry_target(name: str | None, uri: str | None) -> tuple[str, str | None]:
    """The registered model's name and the store, from the options or the project's config
    (conf/train_model.yaml < the params file of IMGPIPE_PARAMS_FILE, as for the stages)."""
    if not (name and uri):
        from imgpipe.compose import load_stage_config

        cfg = load_stage_config("train_model")
        name = name or cfg.mlflow_registered_model_name
        uri = uri or cfg.mlflow_tracking_uri
    if not name:
        raise PipelineError(
            "no registered model name: set mlflow_registered_model_name in "
            "conf/train_model.yaml (or params.yaml), or pass --name (make promote NAME=...)"
        )
    return name, uri


class _ResultLines(logging.Handler):
    """The action's line on stdout (looked up when written), as the command's result."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stdout, flush=True)


def _result_lines(log: logging.Logger) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not any(isinstance(h, _ResultLines) for h in log.handlers):
        log.addHandler(_ResultLines())
    log.setLevel(logging.INFO)
    log.propagate = False
