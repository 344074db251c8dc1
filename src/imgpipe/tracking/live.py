"""dvclive: per-epoch metrics, the summary and the plots that `dvc metrics/plots/exp show` read."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class LiveLog:
    """dvclive's folder for one training; ``images``: at the end, PNGs of its plots into
    ``plots/static`` too (``imgpipe.plots.draw_images``), for viewers without a browser.

    ``prepare`` loads dvclive (and DVC, which it opens) and starts the image renderer's
    engine on a thread while the first epoch trains: on the sample that is most of what
    dvclive cost the training thread (bench/NOTES.md). It writes nothing: the folder is
    made at the first epoch, so a run refused before it leaves the last one's as it was."""

    def __init__(self, live_dir: str | os.PathLike[str], *, images: bool = True) -> None:
        self.live_dir = Path(live_dir)
        self.images = images
        self._live: Any = None
        self._preparing: threading.Thread | None = None
        self._imported = threading.Event()
        self._imported.set()  # until ``prepare``

    def prepare(self) -> None:
        self._imported.clear()
        self._preparing = threading.Thread(
            target=_warm_up, args=(self.images, self._imported), name="dvclive-load"
        )
        self._preparing.start()

    def _prepared(self) -> None:
        """The renderer started too (the images are next)."""
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None

    @property
    def live(self) -> Any:
        if self._live is None:
            self._imported.wait()  # two threads importing one package may see it half-made
            from dvclive import Live

            # dvcyaml=None: dvc.yaml declares metrics and plots itself; dvclive must not
            # rewrite it. Always a fresh directory: on resume the history is replayed from
            # the checkpoint, right even after `dvc repro` deleted the old files or a kill
            # left extra rows.
            self._live = Live(
                dir=str(self.live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None
            )
        return self._live

    def replay(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Write already-completed epochs (from the checkpoint) again."""
        for entry in history:
            self.live.step = entry["epoch"]
            for name, value in entry["metrics"].items():
                self.live.log_metric(name, value)
        if history:
            self.live.make_summary()

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def log_confusion_matrix(self, actual: Sequence[str], predicted: Sequence[str]) -> None:
        self.live.log_sklearn_plot(
            "confusion_matrix", list(actual), list(predicted), name="confusion_matrix.json"
        )

    def end(self) -> Drawing:
        """dvclive's summary now; the images on a thread (``Drawing.join`` waits for them),
        so they are drawn while the MLflow run ends."""
        self._prepared()
        drawing = Drawing(self.live_dir if self._live is not None and self.images else None)
        if self._live is not None:
            self._live.end()
            drawing.start()
        return drawing


class Drawing:
    """``imgpipe.plots.draw_images`` of a dvclive folder on a thread; ``join`` re-raises
    what stopped it."""

    def __init__(self, live_dir: Path | None) -> None:
        self.live_dir = live_dir
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self.live_dir is not None:
            self._thread = threading.Thread(target=self._draw, name="dvclive-images", daemon=True)
            self._thread.start()

    def _draw(self) -> None:
        from imgpipe.plots import draw_images

        try:
            assert self.live_dir is not None
            draw_images(self.live_dir)
        except BaseException as exc:  # raised on the training thread by join()
            self._error = exc

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _warm_up(images: bool, imported: threading.Event) -> None:
    """Import what dvclive's first use imports (``imported`` is set then) and start
    vl-convert's Vega engine (its first render is the slow one). A failure here is left for
    the training thread to meet."""
    try:
        with contextlib.suppress(Exception):
            import dvc.repo
            import dvc.scm  # noqa: F401
            import dvclive.live  # noqa: F401
            from dvclive.dvc import get_dvc_repo  # noqa: F401
    finally:
        imported.set()
    if images:
        with contextlib.suppress(Exception):
            from imgpipe.plots import warm_up_renderer

            warm_up_renderer()
