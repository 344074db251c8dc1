"""The DVC remote, checked before `dvc push` / `dvc pull` move anything.

    python -m imgpipe.remote check [REMOTE]     # `make push-data` / `make pull-data` run it

DVC's own message for a wrong endpoint, a missing bucket or refused keys comes after
its retries and names neither the remote nor the bucket; this check lists the remote's
prefix once and says in one line which remote, bucket and endpoint is at fault (exit 2),
so nothing is half-pushed. The remote is configured the DVC way (`dvc remote add`,
`dvc remote modify ... endpointurl`, keys in the environment or `.dvc/config.local`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from imgpipe.errors import PipelineError
from imgpipe.redact import redact_url


def remote_config(root: Path, name: str | None) -> tuple[str, dict[str, str]]:
    """The remote's name and settings (``.dvc/config`` merged with ``config.local``)."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(root / ".dvc"))
    except ConfigError as exc:
        raise PipelineError(f"{root / '.dvc' / 'config'}: {exc}") from None
    remotes = config.get("remote", {})
    name = name or config.get("core", {}).get("remote")
    if not name:
        raise PipelineError(
            "no default DVC remote: `dvc remote add -d team s3://bucket/prefix` "
            "(README: Working as a team), or name one: REMOTE=<name>"
        )
    if name not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise PipelineError(f"DVC remote '{name}' is not configured (known: {known})")
    return name, {k: str(v) for k, v in remotes[name].items()}


def check_remote(root: Path, name: str | None, env: Mapping[str, str]) -> str:
    """Reach the remote once; the line to show when it answers, PipelineError when not."""
    name, settings = remote_config(root, name)
    url = settings["url"]
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        from imgpipe.stack import check_bucket

        keys = dict(env)
        for key, var in (
            ("access_key_id", "AWS_ACCESS_KEY_ID"),
            ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("session_token", "AWS_SESSION_TOKEN"),
            ("profile", "AWS_PROFILE"),
            ("region", "AWS_DEFAULT_REGION"),
        ):
            if key in settings:
                keys[var] = settings[key]
        endpoint = settings.get("endpointurl")
        check_bucket(url, endpoint, keys, f"DVC remote '{name}'")
        at = f" at {redact_url(endpoint)}" if endpoint else ""
        return f"DVC remote '{name}' ({url}{at}): bucket '{urlsplit(url).netloc}' answers"
    if scheme in ("", "file"):
        folder = Path(urlsplit(url).path if scheme else url)
        folder = folder if folder.is_absolute() else (root / ".dvc" / folder).resolve()
        # A shared folder that is not mounted is the usual fault: DVC would create an empty
        # one on the local disk and "push" there.
        if not folder.is_dir():
            raise PipelineError(f"DVC remote '{name}' ({url}): folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PipelineError(f"DVC remote '{name}' ({url}): folder {folder} is not writable")
        return f"DVC remote '{name}' ({url}): folder {folder} is there"
    return f"DVC remote '{name}' ({redact_url(url)}): not checked ({scheme} remotes are DVC's)"


def main(argv: list[str] | None = None) -> int:
    from imgpipe.cli import fail

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "check" or len(args) > 2:
        print("usage: python -m imgpipe.remote check [REMOTE]", file=sys.stderr)
        return 2
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    try:
        print(check_remote(root, args[1] if len(args) == 2 else None, os.environ))
    except PipelineError as exc:
        fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
