"""Shared plumbing for the Hydra entry points: params layering, one-line errors, the stop
signals (``imgpipe.stop``)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from imgpipe import distributed
from imgpipe.config import conf_dir, params_file_overrides, to_schema
from imgpipe.errors import PipelineError
from imgpipe.stop import Stopped, install

T = TypeVar("T")


def fail(exc: BaseException) -> NoReturn:
    """Print one ``error:`` line (the console log handler would add a second) and exit 2."""
    logging.getLogger("imgpipe").debug("stopped: %s", exc)
    # One of several processes: the line of the rank that failed first, once.
    kind = "peer" if isinstance(exc, distributed.PeerLost) else "error"
    if distributed.speaks(kind, f"error: {exc}"):
        print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


def stopped(exc: Stopped) -> NoReturn:
    """Print one line saying the run stopped on request and how to go on; exit 128 + signal."""
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


def load_config(config_name: str, schema: type, argv: list[str]) -> Any:
    """The typed config a stage would run with: conf/ < the params file (IMGPIPE_PARAMS_FILE)
    < ``argv``, checked; for commands that read the project's settings (the registry's)."""
    return _check_overrides(config_name, schema, params_file_overrides(schema, argv) + argv)


def _check_overrides(config_name: str, schema: type, overrides: list[str]) -> Any:
    """Compose conf/ with the overrides and check the result before any work starts; the
    typed config.

    Hydra's own messages span several lines; users get one naming the key.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    source = f"conf/{config_name}.yaml"
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise PipelineError(f"bad override: {str(exc).splitlines()[0]}") from exc
    known = {f for f in schema.__dataclass_fields__}
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            raise PipelineError(f"override '{override.input_line}' is a sweep: add --multirun")
        if key.startswith("hydra") or override.package or "/" in key:
            continue
        if key not in known:
            raise PipelineError(
                f"{source}: unknown config key '{key}' (known: {', '.join(sorted(known))})"
            )
    try:
        with initialize_config_dir(str(conf_dir())):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise PipelineError(f"{source}: {str(exc).splitlines()[0]}") from exc
    return to_schema(schema, cfg, source)


def run_entry(
    hydra_main: Callable[[], Any],
    config_name: str,
    schema: type,
    sweep: Callable[[list[str]], None] | None = None,
    *,
    immediate: bool = False,
) -> None:
    """Layer params.yaml (under DVC), validate the overrides, then hand over to Hydra.

    ``--multirun`` goes to ``sweep`` (given by the entry point that has one) instead.
    ``immediate``: SIGTERM/SIGINT stop the command wherever it is (its outputs are all
    written atomically), instead of at the next batch boundary (see ``imgpipe.stop``).
    """
    install(immediate=immediate)
    try:
        _run_entry(hydra_main, config_name, schema, sweep)
    except Stopped as exc:  # an immediate stop outside ``guarded`` (Hydra's own set-up)
        stopped(exc)


def _run_entry(
    hydra_main: Callable[[], Any],
    config_name: str,
    schema: type,
    sweep: Callable[[list[str]], None] | None,
) -> None:
    argv = sys.argv[1:]
    multirun = "--multirun" in argv or "-m" in argv
    if multirun and sweep is not None:
        sweep([a for a in argv if a not in ("--multirun", "-m")])
        return
    try:
        if multirun:
            raise PipelineError(f"conf/{config_name}.yaml has no sweep: --multirun does not apply")
        argv = params_file_overrides(schema, argv) + argv
        # Flags (--cfg, --help, ...) are Hydra's own business.
        if not any(arg.startswith("-") for arg in argv):
            _check_overrides(config_name, schema, argv)
    except PipelineError as exc:
        fail(exc)
    sys.argv = [sys.argv[0], *argv]
    hydra_main()
