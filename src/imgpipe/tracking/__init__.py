"""One Tracker for MLflow and dvclive: same metric names, one batched call per epoch.

The pieces, each a room of its own:
- ``store``: the tracking URI (resolved once), its check, the experiment, run tags;
- ``mlflow_run``: one MLflow run's life (``RunSpec`` says what the run is);
- ``live``: dvclive's metrics and plots;
- ``cost``: what tracking costs the run, as it counts it;
- ``parent``: a sweep's parent run;
- ``silent``: what ranks other than 0 of a group track into (nothing).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from imgpipe.redact import redact_url
from imgpipe.stop import Stopped
from imgpipe.tracking.cost import CostMeter, metered
from imgpipe.tracking.live import LiveLog
from imgpipe.tracking.mlflow_run import MlflowRun, RunSpec
from imgpipe.tracking.silent import SilentTracker
from imgpipe.tracking.store import (
    HPTUNING_TAG_ENV,
    check_tracking_uri,
    ensure_experiment,
    resolve_tracking_uri,
    run_tags,
)

__all__ = [
    "HPTUNING_TAG_ENV",
    "RunSpec",
    "SilentTracker",
    "Tracker",
    "check_tracking_uri",
    "ensure_experiment",
    "redact_url",
    "resolve_tracking_uri",
    "run_tags",
]


class Tracker:
    """dvclive (always) and MLflow (when given a ``RunSpec``) behind one small interface.

    Use as a context manager. Entering it starts the MLflow run on a background
    thread, so the first epoch trains meanwhile; the first call that needs the run
    waits for it. The run ends FINISHED, FAILED or KILLED to match how the block
    ended, and dvclive writes its summary. ``blocking_s`` and ``background_cpu_s``
    say what tracking cost (see ``cost``).
    """

    def __init__(
        self, live_dir: str | os.PathLike[str], run: RunSpec | None = None, *, images: bool = True
    ) -> None:
        self.cost = CostMeter()
        self._live = LiveLog(live_dir, images=images)
        self._run = MlflowRun(run, self.cost) if run is not None else None

    @property
    def run_id(self) -> str | None:
        return self._run.run_id if self._run is not None else None

    @property
    def blocking_s(self) -> float:
        return self.cost.blocking_s

    @property
    def background_cpu_s(self) -> float:
        return self.cost.background_cpu_s

    @metered
    def __enter__(self) -> Tracker:
        self._live.prepare()
        if self._run is not None:
            self._run.start()
        return self

    @metered
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        drawing = self._live.end()  # the images are drawn while the run ends
        try:
            if self._run is None:
                return
            if exc_type is None:
                status = "FINISHED"
            elif issubclass(exc_type, (KeyboardInterrupt, Stopped)):
                status = "KILLED"
            else:
                status = "FAILED"
            self._run.end(status)
        finally:
            drawing.join()

    @metered
    def wait(self) -> str | None:
        """Block until the MLflow run exists (re-raising what stopped it); return its id."""
        return self._run.wait() if self._run is not None else None

    def starting(self) -> bool:
        """Whether the MLflow run is still being made (``wait`` would block)."""
        return self._run is not None and self._run.starting()

    @metered
    def replay(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Write already-completed epochs into dvclive; MLflow gets those it lacks."""
        self._live.replay(history)
        if self._run is not None:
            self._run.replay(history)

    @metered
    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self._run is not None:
            self._run.set_tags(tags)

    @metered
    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log one epoch: a single MLflow batch request, and the dvclive step."""
        if self._run is not None:
            self._run.log_epoch(step, metrics)
        self._live.log_epoch(step, metrics)

    @metered
    def log_confusion_matrix(self, actual: Sequence[str], predicted: Sequence[str]) -> None:
        self._live.log_confusion_matrix(actual, predicted)

    @metered
    def log_model(self, model_file: str | os.PathLike[str]) -> None:
        """Log the saved model.pt as the run's MLflow model, off this thread."""
        if self._run is not None:
            self._run.log_model(model_file)
