"""What a training measures, under one set of names used everywhere (MLflow, dvclive, the
checkpoint's history, the sweep): ``train/*`` and ``val/*`` every epoch, ``test/*`` once,
after the last epoch; and the check that stops a run whose loss is no longer a number."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from imgpipe.errors import PipelineError

if TYPE_CHECKING:  # names only: the sweep reads this module's names without torch
    from imgpipe.engine import EpochResult

# Logged every epoch; the test split is evaluated once, after the last epoch (its metrics
# are logged at that step): model selection (a sweep) looks at val only, so test stays unbiased.
METRIC_NAMES = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
TEST_METRIC_NAMES = ("test/loss", "test/accuracy")
# What a sweep optimises, in the order of its values (TrainResult.objectives): never test.
OBJECTIVE_NAMES = ("val/loss", "val/accuracy")


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite: no later epoch can recover."""

    def __init__(self, message: str, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


def check_finite(fit: EpochResult, epoch: int, lr: float, run_id: str | None) -> None:
    if not math.isfinite(fit.loss):
        raise TrainingDiverged(
            f"training diverged in epoch {epoch}: loss {fit.loss} (lr={lr}); "
            "lower lr or check the data",
            run_id,
        )


def epoch_metrics(fit: EpochResult, score: EpochResult) -> dict[str, float]:
    return {
        "train/loss": fit.loss,
        "train/accuracy": fit.accuracy,
        "val/loss": score.loss,
        "val/accuracy": score.accuracy,
    }


def final_metrics(score: EpochResult) -> dict[str, float]:
    return {"test/loss": score.loss, "test/accuracy": score.accuracy}
