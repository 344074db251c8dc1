"""The ``imgpipe`` command: one subcommand per job, one-line errors, today's exit codes.

    imgpipe --help                  # every subcommand, one line each
    imgpipe params                  # conf/ -> params.yaml (`make params`)
    imgpipe promote --run RUN_ID    # any subcommand: imgpipe <sub> --help

This module owns the group and how it fails; each subcommand lives in a small module of
this package (``imgpipe.commands.<module>``) that imports nothing heavy at import time
(torch, mlflow, optuna load inside the command), so ``imgpipe --help`` answers at once.

To add a subcommand: write a ``click.Command`` (or ``click.Group``) in a module of this
package and add one line to ``COMMANDS`` below ("name": "module:attribute"). It is loaded
only when it runs or when ``--help`` lists it. Raise ``PipelineError`` for bad input (one
``error:`` line, exit 2); a SIGTERM/SIGINT stop (``imgpipe.stop.Stopped``) prints its line
and exits 143/130; usage mistakes are one ``error:`` line and exit 2 too. Return nothing;
``raise SystemExit(code)`` for another exit status.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from imgpipe.errors import PipelineError

# name -> "module:attribute" under imgpipe.commands, in the order --help lists them.
COMMANDS: dict[str, str] = {
    "params": "params:params",
    "config": "config:config",
    "data": "data:data",
    "predict": "predict:predict",
    "serve": "predict:serve",
    "sync": "tracking:sync",
    "register": "tracking:register",
    "promote": "tracking:promote",
    "plots": "views:plots",
    "dashboard": "views:dashboard",
    "stack": "team:stack",
    "remote": "team:remote",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported when used (click's documented lazy pattern)."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy, *sorted(set(super().list_commands(ctx)) - set(self.lazy))]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, attribute = self.lazy[cmd_name].split(":")
        command = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
        return command

    def main(self, args: Any = None, prog_name: str | None = None, **kwargs: Any) -> Any:
        """Run without click's standalone handling: errors become our one line."""
        from imgpipe.cli import fail, stopped
        from imgpipe.stop import Stopped

        try:
            rc = super().main(args, prog_name=prog_name, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "imgpipe"
            print(f"error: {exc.format_message()} (see {where} --help)", file=sys.stderr)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C at a prompt
            sys.exit(130)
        except click.ClickException as exc:
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except PipelineError as exc:
            fail(exc)
        except Stopped as exc:
            stopped(exc)
        sys.exit(rc if isinstance(rc, int) else 0)


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
        "terminal_width": 100,
    },
)
def main() -> None:
    """imgpipe: the image-classification pipeline's jobs, one subcommand each.

    The stages themselves run through Make and DVC (`make run`, `dvc exp run -S lr=1.4`).
    """
