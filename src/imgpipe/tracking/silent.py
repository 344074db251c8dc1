"""The tracker of ranks other than 0 in a training on several processes: ``Tracker``'s
interface, writing nothing (rank 0 alone talks to MLflow and dvclive)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any


class SilentTracker:
    """What ranks other than 0 track into: the Tracker's interface, writing nothing."""

    run_id: str | None = None
    blocking_s = 0.0
    background_cpu_s = 0.0

    def __enter__(self) -> SilentTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def wait(self) -> str | None:
        return None

    def starting(self) -> bool:
        return False

    def replay(self, history: Sequence[Mapping[str, Any]]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_confusion_matrix(self, actual: Sequence[str], predicted: Sequence[str]) -> None:
        pass

    def log_model(self, model_file: Any) -> None:
        pass
