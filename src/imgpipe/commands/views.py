"""``imgpipe plots``, ``imgpipe dashboard``: what users look at, on this machine, offline.

imgpipe plots [page] [OUT]      # `make plots`: OUT/index.html (dvc_plots), draws offline
imgpipe plots images LIVE_DIR   # static PNGs of a dvclive folder
imgpipe plots readme DEST       # `make readme-images`: the docs' pictures
imgpipe dashboard [OVERRIDES]   # `make dashboard`: Optuna's dashboard over the sweep's study
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click


@click.group(invoke_without_command=True)
@click.pass_context
def plots(ctx: click.Context) -> None:
    """dvc plots through the offline template, static images, the docs' pictures."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(page)


@plots.command()
@click.argument("out", default="dvc_plots", type=click.Path(file_okay=False))
def page(out: str = "dvc_plots") -> None:
    """OUT/index.html: dvc.yaml's plots, drawn with no network (Vega bundled beside it)."""
    from imgpipe.plots import BUNDLE, write_page

    written = write_page(Path.cwd(), Path(out))
    print(f"plots: {written} (draws offline: {BUNDLE} beside it)")


@plots.command()
@click.argument("live_dir", type=click.Path(file_okay=False))
def images(live_dir: str) -> None:
    """Static PNGs of the curves and confusion matrix of a dvclive folder."""
    from imgpipe.plots import draw_images

    for path in draw_images(live_dir):
        print(path)


@plots.command()
@click.argument("dest", type=click.Path(file_okay=False))
def readme(dest: str) -> None:
    """Copy the pipeline's curves, confusion matrix and Pareto front into DEST."""
    from imgpipe.plots import README_SOURCES, copy_readme_images

    copy_readme_images(Path.cwd(), Path(dest))
    print(f"README images in {dest}: {', '.join(README_SOURCES)}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def dashboard(overrides: tuple[str, ...]) -> None:
    """Optuna's dashboard over the sweep's study on 127.0.0.1:8080 (DASHBOARD_PORT); OVERRIDES
    as for the sweep (hydra.sweeper.storage=...)."""
    from imgpipe.dashboard import find_study, listen_address, serve

    host, port = listen_address()
    url, name, note = find_study("train_model", list(overrides))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it ends
        serve(url, name, host, port, note)
