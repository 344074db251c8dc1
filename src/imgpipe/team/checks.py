"""What the team's servers need, checked before anything starts or moves: the database (a
wrong URL is one line, not MLflow's page of traceback), an S3 bucket with its keys and
endpoint, and the DVC remote before `dvc push` / `dvc pull`.

    imgpipe remote check [REMOTE]     # `make push-data` / `make pull-data` run it

DVC's own message for a wrong endpoint, a missing bucket or refused keys comes after
its retries and names neither the remote nor the bucket; this check lists the remote's
prefix once and says in one line which remote, bucket and endpoint is at fault (exit 2),
so nothing is half-pushed. The remote is configured the DVC way (`dvc remote add`,
`dvc remote modify ... endpointurl`, keys in the environment or `.dvc/config.local`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from imgpipe.errors import PipelineError
from imgpipe.redact import redact_text, redact_url

if TYPE_CHECKING:
    from imgpipe.team.server import ServerSettings


def check_database(url: str, timeout: int = 5) -> None:
    """Connect once, so a wrong URL is one line before the server starts (MLflow would print
    a page of traceback and exit)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return
    import sqlalchemy

    try:
        args = {"connect_timeout": timeout} if url.startswith("postgresql") else {}
        engine = sqlalchemy.create_engine(url, connect_args=args)
        with engine.connect():
            pass
        engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise PipelineError(
            f"database {redact_url(url)} is not usable: {redact_text(reason, url)}"
        ) from None


def check_bucket(url: str, endpoint: str | None, env: Mapping[str, str], what: str) -> None:
    """One listing of ``url`` (s3://bucket/prefix) with the keys in ``env``: a wrong endpoint,
    a missing bucket or refused keys are one line naming ``what``, the bucket and endpoint."""
    import boto3
    import botocore.config
    import botocore.exceptions

    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.lstrip("/")
    where = f"{what} ({url}" + (f" at {redact_url(endpoint)})" if endpoint else ")")
    client = boto3.session.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"),
        profile_name=env.get("AWS_PROFILE") or None,
        region_name=env.get("AWS_DEFAULT_REGION") or "us-east-1",
    ).client(
        "s3",
        endpoint_url=endpoint or None,
        config=botocore.config.Config(
            connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}
        ),
    )
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except botocore.exceptions.NoCredentialsError:
        raise PipelineError(f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID)") from None
    except (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectTimeoutError,
        botocore.exceptions.ReadTimeoutError,
    ):
        raise PipelineError(f"{where}: the endpoint is unreachable") from None
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            raise PipelineError(f"{where}: bucket '{bucket}' does not exist") from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            raise PipelineError(
                f"{where}: the endpoint refused the credentials for bucket '{bucket}' ({code})"
            ) from None
        raise PipelineError(f"{where}: {code or exc}") from None
    except (botocore.exceptions.BotoCoreError, ValueError) as exc:
        raise PipelineError(f"{where}: {type(exc).__name__}: {exc}") from None


def preflight(settings: ServerSettings, env: Mapping[str, str]) -> None:
    """Everything the server needs, checked before it starts."""
    check_database(settings.backend_store)
    if settings.admin_user:
        check_database(settings.auth_database)
    if settings.proxied:
        if not settings.artifacts.startswith("s3://"):
            raise PipelineError(
                f"MLFLOW_ARTIFACTS={settings.artifacts}: expected s3://bucket/prefix"
            )
        check_bucket(settings.artifacts, env.get("MLFLOW_S3_ENDPOINT_URL"), env, "MLFLOW_ARTIFACTS")


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
