"""The stage entry points' plumbing (src/process_data.py, src/train_model.py): the config
loaded once (``imgpipe.compose.load_stage_config``: conf/ < params.yaml under DVC < the
command line), one-line errors with exit 2, the stop signals (``imgpipe.stop``) with 143/130.

The entry scripts take Hydra override strings (``lr=1.4``) and three flags: ``--help``,
``--cfg job`` (print the composed config and stop) and ``--multirun``/``-m`` (the sweep,
for the stage that has one). The ``imgpipe`` command's subcommands use ``fail``/``stopped``
too (``imgpipe.commands``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from imgpipe.errors import PipelineError
from imgpipe.stop import Stopped, install

T = TypeVar("T")


def fail(exc: BaseException) -> NoReturn:
    """Print one ``error:`` line (the console log handler would add a second) and exit 2."""
    from imgpipe import distributed

    logging.getLogger("imgpipe").debug("stopped: %s", exc)
    # One of several processes: the line of the rank that failed first, once.
    kind = "peer" if isinstance(exc, distributed.PeerLost) else "error"
    if distributed.speaks(kind, f"error: {exc}"):
        print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


def stopped(exc: Stopped) -> NoReturn:
    """Print one line saying the run stopped on request and how to go on; exit 128 + signal."""
    from imgpipe import distributed

    line = f"stopped by {exc.signame}{exc.where or ': earlier outputs are intact, run it again'}"
    logging.getLogger("imgpipe").debug(line)
    with contextlib.suppress(OSError):  # the launcher (and its end of the pipe) may be gone
        if distributed.speaks("stopped", line):
            print(line, file=sys.stderr, flush=True)
    sys.exit(exc.exit_code)


def guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn``; a PipelineError becomes one line and exit status 2, a stop (SIGTERM,
    SIGINT) one line and 143 or 130."""
    try:
        return fn(*args, **kwargs)
    except PipelineError as exc:
        fail(exc)
    except Stopped as exc:
        stopped(exc)


def run_stage(
    stage: str,
    run: Callable[[Any], Any],
    *,
    doc: str | None = None,
    sweep: Callable[[list[str]], None] | None = None,
    immediate: bool = False,
    argv: list[str] | None = None,
) -> None:
    """An entry script's whole life: load the stage's typed config once from the command
    line, set up logging in its ``log_dir``, then ``run(config)``.

    ``--multirun`` hands the arguments to ``sweep`` instead (the entry point that has one).
    ``immediate``: SIGTERM/SIGINT stop the command wherever it is (its outputs are all
    written atomically), instead of at the next batch boundary (see ``imgpipe.stop``).
    """
    from imgpipe.compose import load_stage_config, stage_config_yaml
    from imgpipe.logs import setup_logging

    install(immediate=immediate)
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if "-h" in args or "--help" in args:
            print((doc or "").strip() or f"conf/{stage}.yaml keys as key=value overrides")
            return
        if "--multirun" in args or "-m" in args:
            if sweep is None:
                raise PipelineError(f"conf/{stage}.yaml has no sweep: --multirun does not apply")
            sweep([a for a in args if a not in ("--multirun", "-m")])
            return
        show = _take_cfg_flag(args)
        flags = [a for a in args if a.startswith("-")]
        if flags:
            raise PipelineError(
                f"unknown option {flags[0]!r}: give key=value overrides "
                "(flags: --help, --cfg job, --multirun)"
            )
        config = load_stage_config(stage, args)
        if show:
            print(stage_config_yaml(config), end="")
            return
        setup_logging(config.log_dir)
        run(config)
    except PipelineError as exc:
        fail(exc)
    except Stopped as exc:
        stopped(exc)


def _take_cfg_flag(args: list[str]) -> bool:
    """Remove ``--cfg job`` (Hydra's flag, kept for scripts that use it); whether it was there."""
    for flag in ("--cfg", "-c"):
        if flag in args:
            at = args.index(flag)
            if args[at + 1 : at + 2] != ["job"]:
                raise PipelineError(f"{flag} takes 'job' (the stage's composed config)")
            del args[at : at + 2]
            return True
    return False
