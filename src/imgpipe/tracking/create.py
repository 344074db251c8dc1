"""Creating an MLflow run exactly once, when the server's answer can be lost.

MLflow's client retries a POST whose answer did not arrive (a dropped connection, a proxy
that timed out, a server restarted mid-answer). When the server had already acted, the retry
creates a second run: a ghost with the same name, never written to again, RUNNING forever.
Each run is created with a key of its own (a tag); after the call returns, runs holding
that key other than the one returned are deleted, with one line saying so.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

from imgpipe.errors import PipelineError
from imgpipe.redact import redact_url

log = logging.getLogger(__name__)

# The tag every created run carries: unique per creation, so retried creations find each other.
CREATION_KEY_TAG = "imgpipe.creation_key"


def new_run_key() -> str:
    """A creation key, chosen by the trainer before its run exists (kept in checkpoints)."""
    return uuid.uuid4().hex


def create_run_once(
    client: Any,
    experiment_id: str,
    run_name: str | None,
    tags: Mapping[str, str],
    key: str | None = None,
) -> Any:
    """``client.create_run`` with ghost runs from retried requests deleted; the run.
    ``key``: the creation key to tag it with (a new one when None)."""
    key = key or new_run_key()
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, CREATION_KEY_TAG: key})
    _delete_ghosts(client, run, runs_with_key(client, [experiment_id], key))
    return run


def find_run_once(client: Any, experiment_ids: list[str], key: str) -> Any | None:
    """The run created with ``key`` (the one with params, else the first made; its ghosts
    deleted), or None."""
    runs = runs_with_key(client, experiment_ids, key)
    if not runs:
        return None
    first = min(
        runs, key=lambda run: (not run.data.params, run.info.start_time or 0, run.info.run_id)
    )
    _delete_ghosts(client, first, runs)
    return first


def runs_with_key(client: Any, experiment_ids: list[str], key: str) -> list[Any]:
    return list(
        client.search_runs(
            experiment_ids, filter_string=f"tags.`{CREATION_KEY_TAG}` = '{key}'", max_results=50
        )
    )


def _delete_ghosts(client: Any, run: Any, same: list[Any]) -> None:
    for ghost in same:
        if ghost.info.run_id != run.info.run_id:
            client.delete_run(ghost.info.run_id)
            log.info(
                "MLflow run %s was a second copy of run %s (the server's answer was lost and "
                "the request sent again): deleted",
                ghost.info.run_id,
                run.info.run_id,
            )


def refusal(exc: BaseException, tracking_uri: str, experiment: str) -> BaseException:
    """A server's HTTP 403 while opening the run as one line naming the user and the
    experiment (the authenticated team server gives new users READ only); other errors as
    they are."""
    from mlflow.exceptions import MlflowException

    if not (isinstance(exc, MlflowException) and exc.error_code == "PERMISSION_DENIED"):
        return exc
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"user '{user}'" if user else "this login"
    return PipelineError(
        f"MLflow tracking server {redact_url(tracking_uri)}: {who} may not log runs into "
        f"experiment '{experiment}' (HTTP 403 permission denied): ask the team's admin for "
        "EDIT on it"
    )
