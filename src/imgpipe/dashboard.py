"""Optuna's dashboard over the sweep's study, on loopback.

    make dashboard                                   # http://127.0.0.1:8080 (DASHBOARD_PORT)
    make dashboard ARGS="hydra.sweeper.storage=postgresql://optuna@db.internal/optuna"
    IMGPIPE_PARAMS_FILE=params.yaml imgpipe dashboard [overrides as for the sweep]

The study is found as the sweep finds it (``imgpipe.sweep.settings.load_settings`` with
the same overrides and params file), so the dashboard shows the study `make sweep`
would continue. A default SQLite study lives in a folder named by the config and code
it was made with; after an edit that folder does not exist yet, so the newest study of
the same name is shown instead, and the line says so. No study at all: one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from imgpipe.errors import PipelineError
from imgpipe.redact import redact_url

PORT_ENV = "DASHBOARD_PORT"
HOST_ENV = "DASHBOARD_HOST"
DEFAULT_PORT = 8080


def find_study(config_name: str, argv: list[str]) -> tuple[str, str, str]:
    """(storage URL, study name, a note) for the sweep that ``argv`` configures."""
    from imgpipe.sweep.settings import load_settings

    settings = load_settings(config_name, argv)
    url, name = settings.storage, settings.study_name
    if not url.startswith("sqlite:///"):
        return url, name, ""
    db = Path(url.removeprefix("sqlite:///"))
    if db.is_file():
        return url, name, ""
    if Path(settings.study_dir) != db.parent:  # a storage the user named: no other place
        raise PipelineError(f"no study yet: {db} does not exist (run `make sweep` first)")
    others = sorted(db.parent.parent.glob(f"{name}-*/{db.name}"), key=lambda p: p.stat().st_mtime)
    if not others:
        raise PipelineError(f"no study {name!r} yet in {db.parent.parent} (run `make sweep` first)")
    return (
        f"sqlite:///{others[-1]}",
        name,
        " (the newest one: the current config and code would start a new study)",
    )


def listen_address() -> tuple[str, int]:
    host = os.environ.get(HOST_ENV) or "127.0.0.1"
    text = os.environ.get(PORT_ENV) or str(DEFAULT_PORT)
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise PipelineError(f"{PORT_ENV}={text!r}: expected a port number (1-65535)")
    return host, int(text)


def serve(url: str, study_name: str, host: str, port: int, note: str = "") -> None:
    """Serve the dashboard until Ctrl-C or SIGTERM; a study missing from the storage, or
    an address taken, is one line."""
    import optuna
    from optuna_dashboard import run_server

    from imgpipe.sweep.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url)
    names = {s.study_name for s in storage.get_all_studies()}
    if study_name not in names:
        raise PipelineError(f"no study {study_name!r} yet in {redact_url(url)} (run `make sweep`)")
    print(
        f"Optuna dashboard: study {study_name!r} in {redact_url(url)}{note}\n"
        f"  http://{host}:{port}/dashboard/  (Ctrl-C stops it)",
        flush=True,
    )
    try:
        run_server(storage, host=host, port=port)
    except OSError as exc:
        raise PipelineError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (set {PORT_ENV})"
        ) from None
