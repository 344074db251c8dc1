"""``imgpipe config``: the configuration as a stage sees it, and its reference page.

imgpipe config show train_model lr=1.4   # the typed config after conf/ < params < overrides
imgpipe config reference [PATH]          # docs/configuration.md, generated from the schema
imgpipe config reference --check [PATH]  # exit 1 when the committed page is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from imgpipe.config import SCHEMAS  # light: the schemas, no Hydra until a command runs

STAGES = click.Choice(list(SCHEMAS))


@click.group()
def config() -> None:
    """The stages' configuration: composed, or documented."""


@config.command(context_settings={"ignore_unknown_options": True})
@click.argument("stage", type=STAGES)
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def show(stage: str, overrides: tuple[str, ...]) -> None:
    """Print STAGE's config as it would run: conf/ < the params file (IMGPIPE_PARAMS_FILE) <
    OVERRIDES (key=value)."""
    from imgpipe.compose import load_stage_config, stage_config_yaml

    print(stage_config_yaml(load_stage_config(stage, overrides)), end="")


@config.command()
@click.argument("path", default="docs/configuration.md", type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="exit 1 when PATH differs from what is generated")
def reference(path: str, check: bool) -> None:
    """Write the configuration reference (every key: type, default, stage, what it changes)
    from the schema and conf/'s comments."""
    from imgpipe.atomic import write_text_atomic
    from imgpipe.reference import configuration_reference

    text = configuration_reference()
    if check:
        try:
            current = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            print(
                f"error: {path} is out of date with the schema: run `imgpipe config reference`",
                file=sys.stderr,
            )
            raise SystemExit(1)
        return
    write_text_atomic(path, text)
    print(f"wrote {path} from the schema (src/imgpipe/config.py) and conf/")
