"""Creating an MLflow run exactly once, when the server's answer can be lost.

MLflow's client retries a POST whose answer did not arrive (a dropped connection, a proxy
that timed out, a server restarted mid-answer). When the server had already acted, the retry
creates a second run: a ghost with the same name, never written to again, RUNNING forever.
Each run is created with a key of its own (a tag); after the call returns, runs holding
that key other than the one returned are deleted, with one line saying so.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

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
