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


def create_run_once(
    client: Any, experiment_id: str, run_name: str | None, tags: Mapping[str, str]
) -> Any:
    """``client.create_run`` with ghost runs from retried requests deleted; the run."""
    key = uuid.uuid4().hex
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, CREATION_KEY_TAG: key})
    same = client.search_runs(
        [experiment_id], filter_string=f"tags.`{CREATION_KEY_TAG}` = '{key}'", max_results=50
    )
    for ghost in same:
        if ghost.info.run_id != run.info.run_id:
            client.delete_run(ghost.info.run_id)
            log.info(
                "MLflow run %s was a second copy of run %s (the server's answer was lost and "
                "the request sent again): deleted",
                ghost.info.run_id,
                run.info.run_id,
            )
    return run


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
