"""Progress bars: when they show, and the three the project draws (decoding, a training
epoch, a sweep).

A bar shows only where a person watches: stderr is a terminal, ``CI`` is not true and this
is rank 0 of a distributed run. Logs, pipes, CI and DVC's captured output stay free of
carriage returns; the per-epoch log lines are written either way. ``IMGPIPE_PROGRESS``
overrides the guess: ``on`` (draw even into a pipe), ``off``, or ``auto`` (the default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

from imgpipe.errors import PipelineError

PROGRESS_ENV = "IMGPIPE_PROGRESS"
_ON = {"on", "1", "true", "yes"}
_OFF = {"off", "0", "false", "no"}


def enabled(stream: IO[str] | None = None) -> bool:
    """Whether bars are drawn on ``stream`` (stderr by default)."""
    raw = os.environ.get(PROGRESS_ENV, "auto")
    setting = raw.strip().lower()
    if setting in _OFF:
        return False
    if setting not in _ON and setting != "auto":
        raise PipelineError(f"{PROGRESS_ENV}={raw!r}: expected auto, on or off")
    # torchrun sets RANK: one bar for the whole job, not one per process on top of each other.
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return False
    if setting in _ON:
        return True
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def hide_in_this_process() -> None:
    """No bars from this process (nor its children): a sweep's worker processes, whose
    bars would overwrite each other's and the main process's line. When the main process
    draws on this terminal, this one's console lines first clear the bar's line (the main
    process draws it again below them) instead of starting at its end."""
    shared = enabled()
    os.environ[PROGRESS_ENV] = "off"
    if shared:
        root = logging.getLogger()
        root.handlers = [_clearing(h) if _is_console(h) else h for h in root.handlers]


def bar(show: bool = True, **kwargs: Any):
    """A tqdm bar on stderr under the policy above, or a disabled one (which costs nothing
    to update) when ``show`` is False: a DDP rank other than 0, a sweep's worker process."""
    from tqdm import tqdm

    kwargs.setdefault("file", sys.stderr)
    return tqdm(disable=not (show and enabled(kwargs["file"])), dynamic_ncols=True, **kwargs)


class _AboveBars(logging.StreamHandler):
    """A console handler that writes through tqdm, which clears the bars, writes the line
    and draws them again below it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging's own handlers do: report, never raise into the run
            self.handleError(record)


class _ClearingLine(logging.StreamHandler):
    """Console lines that start by clearing what is on the terminal's current line."""

    def format(self, record: logging.LogRecord) -> str:
        return "\r\x1b[K" + super().format(record)


def _clearing(handler: logging.StreamHandler) -> logging.StreamHandler:
    return _copy_settings(handler, _ClearingLine(handler.stream))


@contextlib.contextmanager
def logging_beside(active: bool) -> Iterator[None]:
    """While a bar is drawn, console log lines go above it instead of through the middle
    of it. (tqdm's logging_redirect_tqdm drops the handler's level: DEBUG lines would show.)"""
    root = logging.getLogger()
    original = list(root.handlers)
    if active:
        root.handlers = [_above_bars(h) if _is_console(h) else h for h in original]
    try:
        yield
    finally:
        if active:
            root.handlers = original


def _is_console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout)


def _above_bars(handler: logging.StreamHandler) -> _AboveBars:
    return _copy_settings(handler, _AboveBars(handler.stream))


def _copy_settings(old: logging.Handler, new: logging.Handler):
    new.setLevel(old.level)
    new.setFormatter(old.formatter)
    new.filters = list(old.filters)
    return new


class EpochBar:
    """Batches done in one training epoch and the mean of the batch losses sampled so far.

    ``update`` is the engine's ``on_progress``: it is called every ``log_interval`` batches,
    where the engine reads the loss anyway, so drawing adds no device sync."""

    def __init__(self, epoch: int, epochs: int, show: bool = True) -> None:
        self._desc = f"epoch {epoch}/{epochs}"
        self.active = show and enabled()
        self._bar = None  # drawn at the first update, which knows the number of batches
        self._loss_sum = 0.0
        self._samples = 0

    def update(self, step: int, steps: int, loss: float) -> None:
        if not self.active:
            return
        self._loss_sum += loss
        self._samples += 1
        shown = f"loss {self._loss_sum / self._samples:.4f}"
        if self._bar is None:  # first drawn with this update's numbers, not at 0
            self._bar = bar(
                desc=self._desc, total=steps, initial=step, postfix=shown, unit="batch", leave=False
            )
            return
        self._bar.set_postfix_str(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def epoch_bar(epoch: int, epochs: int, show: bool = True) -> Iterator[EpochBar]:
    progress = EpochBar(epoch, epochs, show)
    try:
        with logging_beside(progress.active):
            yield progress
    finally:
        progress.close()


class SweepBar:
    """Trials done of ``n_trials`` in the whole study, and the best value so far of the
    first objective (the sweep computes both from its storage: every worker's trials)."""

    def __init__(self, n_trials: int) -> None:
        self._bar = bar(desc="sweep", total=n_trials, unit="trial", position=0)

    @property
    def active(self) -> bool:
        return not self._bar.disable

    def update(self, done: int, best: float | None = None, objective: str = "") -> None:
        if self._bar.disable:
            return
        if best is not None:
            self._bar.set_postfix_str(f"best {best:.4g} ({objective})", refresh=False)
        self._bar.update(min(done, self._bar.total) - self._bar.n)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


@contextlib.contextmanager
def sweep_bar(n_trials: int) -> Iterator[SweepBar]:
    progress = SweepBar(n_trials)
    try:
        with logging_beside(progress.active):
            yield progress
    finally:
        progress.close()
