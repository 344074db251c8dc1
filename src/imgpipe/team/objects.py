"""Every object the project's outputs need is on the DVC remote: checked after `dvc push`,
and what is missing is uploaded from the cache (or named, when the cache lacks it too).

    imgpipe remote verify [REMOTE]    # `make push-data` runs it after dvc push

`dvc push` trusts a directory entry (``<md5>.dir``) it finds on the remote: every file
under it counts as pushed. An object lost from the remote afterwards (a push interrupted
by a remote that then kept the entry, a lifecycle rule, a hand-deleted key) is never sent
again, `dvc status --cloud` says in sync, and a fresh clone's `dvc pull` fails on that one
file. This asks the remote for each file object of every cached output, one listing call
per batch, through DVC's own remote settings and credentials.
"""

from __future__ import annotations

import json
from pathlib import Path

from imgpipe.errors import PipelineError
from imgpipe.team.checks import remote_config


def needed_objects(repo: object) -> dict[str, str]:
    """Each object (md5, ``.dir`` listings included) the cached outputs need, with the
    workspace path it stands for. Outputs not in this cache are left to `dvc push`, which
    names them itself."""
    local = repo.cache.local  # type: ignore[attr-defined]
    needed: dict[str, str] = {}
    for out in repo.index.outs:  # type: ignore[attr-defined]
        oid = out.hash_info.value if out.use_cache and out.hash_info else None
        if not oid or not local.fs.exists(local.oid_to_path(oid)):
            continue
        needed[oid] = str(out)
        if out.hash_info.isdir:
            try:
                entries = json.loads(Path(local.oid_to_path(oid)).read_text())
            except (OSError, ValueError):
                continue
            for entry in entries:
                needed[entry["md5"]] = f"{out}/{entry['relpath']}"
    return needed


def verify_remote(root: Path, name: str | None) -> str:
    """Upload the objects the remote lacks; the line to show. PipelineError (one line) when
    an object is missing from both the remote and this cache."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    name, _ = remote_config(root, name)
    try:
        with Repo(str(root)) as repo:
            remote = repo.cloud.get_remote_odb(name)
            local = repo.cache.local
            needed = needed_objects(repo)
            present = set(remote.oids_exist(list(needed)))
            missing = [oid for oid in needed if oid not in present]
            lost = [oid for oid in missing if not local.fs.exists(local.oid_to_path(oid))]
            repaired = [oid for oid in missing if oid not in lost]
            for oid in repaired:
                remote.add(local.oid_to_path(oid), local.fs, oid)
    except DvcException as exc:
        raise PipelineError(f"DVC remote '{name}': {exc}") from None
    if lost:
        raise PipelineError(
            f"DVC remote '{name}': {len(lost)} object(s) are missing from the remote and from "
            f"this cache, e.g. {needed[lost[0]]} (md5 {lost[0]}): push from a clone that has it"
        )
    if repaired:
        return (
            f"DVC remote '{name}': {len(repaired)} object(s) under outputs already pushed were "
            f"missing (e.g. {needed[repaired[0]]}): uploaded again"
        )
    return f"DVC remote '{name}': all {len(needed)} objects of the cached outputs are there"
