"""``imgpipe params``: params.yaml written from conf/, or checked against it.

imgpipe params [write] [PATH]   # `make params` (PATH: params.yaml)
imgpipe params check [PATH]     # `make params-check`, the pre-commit hook: exit 1 when stale
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

PATH = click.argument("path", default="params.yaml", type=click.Path(dir_okay=False))


@click.group(invoke_without_command=True)
@click.pass_context
def params(ctx: click.Context) -> None:
    """Write params.yaml from conf/ (what DVC tracks), or check it is up to date."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(write)


@params.command()
@PATH
def write(path: str = "params.yaml") -> None:
    """Write PATH (params.yaml) from conf/pipeline.yaml."""
    from imgpipe.atomic import write_text_atomic
    from imgpipe.compose import PIPELINE_CONFIG, compose_params

    write_text_atomic(path, compose_params())
    print(f"wrote {path} from conf/{PIPELINE_CONFIG}.yaml")


@params.command()
@PATH
def check(path: str) -> None:
    """Exit 1 when PATH differs from what conf/ composes."""
    from imgpipe.compose import compose_params

    try:
        current = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    if current != compose_params():
        print(f"error: {path} is out of date with conf/: run `make params`", file=sys.stderr)
        raise SystemExit(1)
