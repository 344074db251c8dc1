"""What tracking costs a run, as the run itself counts it.

Two numbers: the wall time the training thread spends inside tracking calls, and
the CPU time the thread that creates the MLflow run uses while the first epoch
trains. Where the training thread waits for that thread, the two overlap: their
sum is an upper bound.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast


class CostMeter:
    def __init__(self) -> None:
        self.blocking_s = 0.0
        self.background_cpu_s = 0.0
        self._depth = 0  # calls made inside a counted call count once

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        """Count the wall time of the block, unless a counted block encloses it."""
        if self._depth:
            yield
            return
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            self.blocking_s += time.perf_counter() - start

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Count the CPU time this (background) thread spends in the block."""
        start = time.thread_time()
        try:
            yield
        finally:
            self.background_cpu_s += time.thread_time() - start


_Method = TypeVar("_Method", bound=Callable[..., Any])


def metered(method: _Method) -> _Method:
    """A method whose wall time counts against ``self.cost`` (a CostMeter)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.cost.blocking():
            return method(self, *args, **kwargs)

    return cast(_Method, wrapper)
