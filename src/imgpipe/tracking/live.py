"""dvclive: per-epoch metrics, the summary and the plots that `dvc metrics/plots/exp show` read."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class LiveLog:
    """dvclive's folder for one training; ``images``: at the end, PNGs of its plots into
    ``plots/static`` too (``imgpipe.plots.draw_images``), for viewers without a browser."""

    def __init__(self, live_dir: str | os.PathLike[str], *, images: bool = True) -> None:
        self.live_dir = Path(live_dir)
        self.images = images
        self._live: Any = None

    @property
    def live(self) -> Any:
        if self._live is None:
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

    def end(self) -> None:
        if self._live is not None:
            self._live.end()
            if self.images:
                from imgpipe.plots import draw_images

                draw_images(self.live_dir)
