"""``imgpipe stack``, ``imgpipe remote``: the team set-up (a local stack of object server +
PostgreSQL + MLflow, the DVC remote checked before it is used).

    imgpipe stack up | down | env   # `make stack-up`, `make stack-down`, `make stack-env`
    imgpipe stack server            # `make mlflow-server` with MLFLOW_BACKEND_STORE=... (team)
    imgpipe remote check [REMOTE]   # before `make push-data` / `make pull-data`
    imgpipe remote verify [REMOTE]  # after `dvc push` in `make push-data`: repairs what it skipped
"""

from __future__ import annotations

import os
from pathlib import Path

import click


def _root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def _say(out: str) -> None:
    print(out, end="" if out.endswith("\n") else "\n")


@click.group()
def stack() -> None:
    """The local team stack: object server, PostgreSQL database, team MLflow server."""


@stack.command()
def up() -> None:
    """Start the stack on 127.0.0.1; prints the environment to source (.stack/env)."""
    from imgpipe.team.stack import up as start

    _say(start(os.environ, _root()))


@stack.command()
def down() -> None:
    """Stop what `imgpipe stack up` started (data kept under .stack/)."""
    from imgpipe.team.stack import down as stop

    _say(stop(os.environ, _root()))


@stack.command()
def env() -> None:
    """Print the stack's environment file again (source .stack/env)."""
    from imgpipe.team.stack import show_env

    _say(show_env(os.environ, _root()))


@stack.command()
def server() -> None:
    """The team MLflow server in the foreground (database store, proxied artifacts, auth)."""
    from imgpipe.team.server import serve

    raise SystemExit(serve(os.environ, _root()))


@click.group()
def remote() -> None:
    """The DVC remote."""


@remote.command()
@click.argument("name", required=False)
def check(name: str | None) -> None:
    """Check the DVC remote NAME (default: the default remote) is there and usable."""
    from imgpipe.team.checks import check_remote

    print(check_remote(_root(), name, os.environ))


@remote.command()
@click.argument("name", required=False)
def verify(name: str | None) -> None:
    """After dvc push: every object of the cached outputs is on remote NAME; the ones it lacks
    under directories it already holds (which dvc push skips) are uploaded again."""
    from imgpipe.team.objects import verify_remote

    print(verify_remote(_root(), name))
