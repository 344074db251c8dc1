"""The MLflow outbox: per-epoch metric batches and tags, sent in order by a background thread.

Training never waits for the tracking server and never stops because it is gone. A batch
that fails to send (connection refused, a timeout, HTTP 5xx, any ``MlflowException``) stays
at the head of the queue and is retried with backoff; one warning says tracking is lost,
one that it is back. The checkpoint holds the whole history anyway (it is the source of
truth): what never arrives is added later by ``imgpipe sync``.

Exactly once: a batch whose request failed may still have reached the server (the answer
was lost), so before sending it again the run's history is read and the metrics already
there for its step are left out. Retried rows also keep their first timestamp, so a SQL
store would drop an identical row anyway.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from imgpipe.redact import redact_url
from imgpipe.tracking.cost import CostMeter

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.5  # backoff between attempts while the server is gone: doubled up to...
MAX_DELAY_S = 10.0
HURRY_DELAY_S = 1.0  # ...and this while the run's end waits for the queue to drain
PROBE_TIMEOUT_S = 5.0


@dataclass
class Batch:
    """One request: an epoch's metrics (``step``) or a set of tags (``step`` None)."""

    step: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))


def send_failures() -> tuple[type[BaseException], ...]:
    """What a send raises when the store is unreachable or refuses for now: the tracking
    server, or an artifact store the client writes itself (S3: botocore's errors, which
    are no OSError)."""
    import requests
    from mlflow.exceptions import MlflowException

    failures: tuple[type[BaseException], ...] = (
        MlflowException,
        requests.RequestException,
        OSError,
    )
    try:
        import botocore.exceptions
    except ImportError:  # no S3 client installed: no S3 artifacts either
        return failures
    return (*failures, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


def failure_reason(exc: BaseException, uri: str) -> str:
    """A short reason that never shows the URL (MLflow's messages quote it, password too)."""
    code = getattr(exc, "get_http_status_code", None)
    error_code = getattr(exc, "error_code", None)
    if "Failed to establish a new connection" in str(exc) or "NewConnectionError" in str(exc):
        return "connection refused"
    if error_code and error_code != "INTERNAL_ERROR":
        return str(error_code)
    if callable(code) and code() and code() != 500:
        return f"HTTP {code()}"
    return type(exc).__name__


class Outbox:
    """Batches for one run, delivered in order on a daemon thread ("mlflow-outbox")."""

    def __init__(self, tracking_uri: str, run_id: str, cost: CostMeter) -> None:
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.run_id = run_id
        self.cost = cost
        self._client = MlflowClient(tracking_uri)
        self._queue: collections.deque[Batch] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._hurry = False
        self._lost: str | None = None  # the reason, while tracking is lost
        self._uncertain = False  # the head batch's last request may have arrived
        self._error: BaseException | None = None  # a bug, not an outage: re-raised by check()
        self._thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- the training thread

    def put(self, batch: Batch) -> None:
        self.check()
        with self._cond:
            self._queue.append(batch)
            self._cond.notify_all()

    def check(self) -> None:
        """Re-raise, in the caller's thread, an error that is not an outage."""
        if self._error is not None:
            raise self._error

    @property
    def lost(self) -> str | None:
        return self._lost

    def pending_steps(self) -> list[int]:
        with self._cond:
            return sorted({b.step for b in self._queue if b.step is not None})

    def drain(self, timeout_s: float) -> bool:
        """Wait for every batch to arrive, giving up once none has for ``timeout_s``
        (a backlog after an outage drains in full); True when they all did."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            left = len(self._queue)
            while self._queue and self._error is None and self._thread.is_alive():
                if len(self._queue) < left:  # progress: the server is there
                    left = len(self._queue)
                    deadline = time.monotonic() + timeout_s
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                self._cond.wait(wait)
            done = not self._queue
        self.check()
        return done

    def close(self) -> None:
        """Stop the thread once it is idle; an unsent batch is left to the sync command."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ----------------------------------------------------------------- the outbox thread

    def _run(self) -> None:
        failures = send_failures()
        delay = FIRST_DELAY_S
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue or (self._closed and self._lost):
                    return
                batch = self._queue[0]
            try:
                with self.cost.background():
                    self._deliver(batch)
            except failures as exc:
                self._on_lost(failure_reason(exc, self.uri))
                with self._cond:
                    self._cond.wait(min(delay, HURRY_DELAY_S) if self._hurry else delay)
                delay = min(delay * 2, MAX_DELAY_S)
                continue
            except BaseException as exc:  # a bug: stop sending, re-raised by check()
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            delay = FIRST_DELAY_S
            with self._cond:
                self._queue.popleft()
                self._uncertain = False
                self._cond.notify_all()
            if self._lost is not None:
                self._on_back()

    def _deliver(self, batch: Batch) -> None:
        from mlflow.entities import Metric, RunTag

        if self._lost is not None:
            self._probe()
        metrics = batch.metrics
        if self._uncertain and metrics:
            metrics = self._not_yet_logged(batch)
        if not metrics and not batch.tags:
            return
        self._uncertain = True  # from here on the request may arrive whatever we hear back
        self._client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, batch.timestamp_ms, batch.step or 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in batch.tags.items()],
        )

    def _not_yet_logged(self, batch: Batch) -> dict[str, float]:
        """The batch's metrics whose step the run does not hold yet."""
        return {
            key: value
            for key, value in batch.metrics.items()
            if all(m.step != batch.step for m in self._client.get_metric_history(self.run_id, key))
        }

    def _probe(self) -> None:
        """While the server is gone, ask /health (fails in milliseconds) before sending:
        the client's own retries would sleep through minutes of backoff per attempt."""
        if urlsplit(self.uri).scheme not in ("http", "https"):
            return
        import requests

        response = requests.get(self.uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
        if response.status_code != 200:
            raise requests.HTTPError(f"HTTP {response.status_code}", response=response)

    def _on_lost(self, reason: str) -> None:
        if self._lost is None:
            log.warning(
                "MLflow tracking at %s is lost (%s): training goes on, its metrics are kept "
                "and sent when the server answers again",
                redact_url(self.uri),
                reason,
            )
        self._lost = reason

    def _on_back(self) -> None:
        self._lost = None
        log.warning(
            "MLflow tracking at %s is back: sending the %d kept batches",
            redact_url(self.uri),
            len(self._queue) + 1,
        )


def missing_batches(
    history: list[Mapping[str, object]], logged: Mapping[str, set[int]]
) -> list[Batch]:
    """The checkpoint's epochs (``history``) minus the steps MLflow holds per metric."""
    batches = []
    for entry in history:
        step = int(entry["epoch"])  # type: ignore[call-overload]
        metrics = entry["metrics"]
        assert isinstance(metrics, Mapping)
        fresh = {k: float(v) for k, v in metrics.items() if step not in logged.get(k, set())}
        if fresh:
            batches.append(Batch(step, fresh))
    return batches
