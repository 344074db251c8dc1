"""The team MLflow server: its settings (from the environment), the command and environment
it runs with, its users, and running it in the foreground (``serve``).

    imgpipe stack server   # `make mlflow-server`, in the foreground

The server reads its settings from the environment, never from a command line or a file
in git, so passwords stay out of `ps`, shell history and the repository:
  MLFLOW_BACKEND_STORE   database URL (postgresql://...); unset: <project>/mlruns/mlflow.db
  MLFLOW_ARTIFACTS       s3://bucket/prefix: proxied artifacts, clients need no S3 keys
                         (the server needs MLFLOW_S3_ENDPOINT_URL and AWS_* keys)
  MLFLOW_AUTH_ADMIN_PASSWORD   switches on basic authentication (admin: MLFLOW_AUTH_ADMIN_USERNAME,
                         default admin); IMGPIPE_MLFLOW_USERS="alice:pw1:EDIT bob:pw2" adds users
  IMGPIPE_MLFLOW_EXPERIMENTS, IMGPIPE_MLFLOW_MODELS   the team's experiments (default
                         image-classification) and registered models (default none)
A new user may read everything and change nothing (READ) until granted: a user marked
``:EDIT`` gets EDIT on the team's experiments and registered models, which the server
creates as the admin at start, so no member owns them; anything else is refused (HTTP 403).
  MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS   127.0.0.1, 5000, 1
What is checked before it starts lives in ``imgpipe.team.checks``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from imgpipe.errors import PipelineError
from imgpipe.redact import redact_url
from imgpipe.team.checks import preflight

# What a user may do where nobody granted more. EDIT for everyone would let any login
# overwrite any experiment's artifacts, a logged model's MLmodel included.
DEFAULT_PERMISSION = "READ"
GRANTABLE = ("READ", "EDIT", "MANAGE")
DEFAULT_EXPERIMENTS = "image-classification"  # conf/train_model.yaml's mlflow_exp_name
START_TIMEOUT_S = 120.0
MIN_PASSWORD = 12  # MLflow's basic auth refuses shorter passwords


def tool(name: str) -> str:
    """A tool of the environment this interpreter runs in (mlflow, weed), else from PATH."""
    own = Path(sys.executable).parent / name
    return str(own) if own.exists() else name


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    workers: int
    backend_store: str
    artifacts: str  # s3://... (proxied) or a folder (the embedded default)
    proxied: bool
    admin_user: str | None  # None: no authentication
    auth_database: str
    users: dict[str, str]
    grants: dict[str, str] = field(default_factory=dict)  # user -> permission on team resources
    experiments: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str], root: Path) -> ServerSettings:
        store = env.get("MLFLOW_BACKEND_STORE") or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
        artifacts = env.get("MLFLOW_ARTIFACTS") or ""
        auth = bool(env.get("MLFLOW_AUTH_ADMIN_PASSWORD"))
        users: dict[str, str] = {}
        grants: dict[str, str] = {}
        for item in env.get("IMGPIPE_MLFLOW_USERS", "").split():
            name, sep, password = item.partition(":")
            secret, mark, permission = password.rpartition(":")
            if mark and permission.upper() in GRANTABLE:
                password = secret
                grants[name] = permission.upper()
            if not (sep and name and password):
                raise PipelineError(
                    f"IMGPIPE_MLFLOW_USERS: '{name}' is not user:password[:EDIT] "
                    "(space-separated entries)"
                )
            users[name] = password
        for name, password in [
            ("MLFLOW_AUTH_ADMIN_PASSWORD", env.get("MLFLOW_AUTH_ADMIN_PASSWORD"))
        ] + [(f"IMGPIPE_MLFLOW_USERS: the password of '{n}'", pw) for n, pw in users.items()]:
            if password and len(password) < MIN_PASSWORD:
                raise PipelineError(
                    f"{name} is shorter than {MIN_PASSWORD} characters (MLflow's minimum)"
                )
        if users and not auth:
            raise PipelineError(
                "IMGPIPE_MLFLOW_USERS needs MLFLOW_AUTH_ADMIN_PASSWORD (basic auth)"
            )
        return cls(
            host=env.get("MLFLOW_HOST") or "127.0.0.1",
            port=env_int(env, "MLFLOW_PORT", 5000),
            workers=env_int(env, "MLFLOW_WORKERS", 1),
            backend_store=store,
            artifacts=artifacts or str(root / "mlruns" / "artifacts"),
            proxied=bool(artifacts),
            admin_user=(env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin") if auth else None,
            auth_database=env.get("MLFLOW_AUTH_DATABASE_URI")
            or f"sqlite:///{root / 'mlruns' / 'basic_auth.db'}",
            users=users,
            grants=grants,
            experiments=tuple(
                (env.get("IMGPIPE_MLFLOW_EXPERIMENTS") or DEFAULT_EXPERIMENTS).split()
            ),
            models=tuple(env.get("IMGPIPE_MLFLOW_MODELS", "").split()),
        )


def env_int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key) or str(default)
    try:
        return int(value)
    except ValueError:
        raise PipelineError(f"{key}={value!r} is not a number") from None


def server_command(settings: ServerSettings) -> list[str]:
    """The `mlflow server` command line: no store URL and no password on it (they go through
    the environment, see ``server_env``), so `ps` never shows a secret."""
    return [
        tool("mlflow"),
        "server",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--workers",
        str(settings.workers),
        *(["--app-name", "basic-auth"] if settings.admin_user else []),
    ]


def server_env(
    settings: ServerSettings, env: Mapping[str, str], auth_config: Path | None
) -> dict[str, str]:
    """What the server process runs with: the store and artifact settings as MLflow's own
    variables for --backend-store-uri / --artifacts-destination / --default-artifact-root."""
    out = {
        **env,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": env.get(
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"
        ),
        "MLFLOW_BACKEND_STORE_URI": settings.backend_store,
    }
    if settings.proxied:
        out["MLFLOW_ARTIFACTS_DESTINATION"] = settings.artifacts
    else:
        out["MLFLOW_DEFAULT_ARTIFACT_ROOT"] = settings.artifacts
    if auth_config is not None:
        out["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
        # The auth app's CSRF protection needs a key; one server: a fresh one per start.
        out.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_urlsafe(32))
        out["MLFLOW_AUTH_ADMIN_USERNAME"] = settings.admin_user or "admin"
    return out


@contextlib.contextmanager
def auth_config_file(settings: ServerSettings) -> Iterator[Path | None]:
    """MLflow's auth ini in a private temp folder for the server's lifetime. It holds no
    password: the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD in the server's env."""
    if not settings.admin_user:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="imgpipe-mlflow-auth-"))  # mode 0700
    path = folder / "basic_auth.ini"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(
                "[mlflow]\n"
                f"default_permission = {DEFAULT_PERMISSION}\n"
                f"database_uri = {settings.auth_database}\n"
                f"admin_username = {settings.admin_user}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                # Checking a password (PBKDF2) costs more than the request it guards: one
                # server process, so a cached check goes stale nowhere else (several: no cache).
                f"auth_cache_ttl_seconds = {60 if settings.workers == 1 else 0}\n"
            )
        yield path
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text()[-600:].strip().splitlines()[-1:] if log else []
            why = f": {tail[0]}" if tail else ""
            raise PipelineError(f"MLflow server {url} did not start{why}")
        time.sleep(0.3)


def _api(url: str, path: str, auth: tuple[str, str], method: str, body: dict) -> tuple[int, str]:
    """One call of MLflow's API as ``auth`` (user, password): the status, and the body (an
    error's message)."""
    token = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if method != "GET" else None,
        method=method,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):
            text = json.loads(text).get("message", text)
        return exc.code, text.strip()


def create_users(settings: ServerSettings, admin_password: str) -> None:
    """Users from IMGPIPE_MLFLOW_USERS, created (or their password updated) by the admin."""
    admin = (settings.admin_user or "admin", admin_password)
    status, _ = _api(settings.url, f"/api/2.0/mlflow/users/get?username={admin[0]}", admin,
                     "GET", {})  # fmt: skip
    if status == 401:
        raise PipelineError(
            f"MLflow server {settings.url}: the auth database {redact_url(settings.auth_database)}"
            f" already has user '{admin[0]}' with another password than MLFLOW_AUTH_ADMIN_PASSWORD"
        )
    for name, password in settings.users.items():
        body = {"username": name, "password": password}
        status, message = _api(settings.url, "/api/2.0/mlflow/users/create", admin, "POST", body)
        if status != 200 and "already exists" in message:
            status, message = _api(settings.url, "/api/2.0/mlflow/users/update-password", admin,
                                   "PATCH", body)  # fmt: skip
        if status != 200:
            message = message.replace(password, "***").replace(admin_password, "***")
            raise PipelineError(
                f"MLflow server {settings.url}: cannot add user '{name}': {message or status}"
            )
    grant(settings, admin)


def grant(settings: ServerSettings, admin: tuple[str, str]) -> None:
    """The team's experiments and registered models, created by the admin when missing, and
    each user's granted permission on them (everyone else keeps DEFAULT_PERMISSION)."""
    if not settings.grants:
        return
    resources = []
    for name in settings.experiments:
        status, found = _api(settings.url, "/api/2.0/mlflow/experiments/get-by-name?" +
                             urlencode({"experiment_name": name}), admin, "GET", {})  # fmt: skip
        if status == 404:
            status, found = _api(settings.url, "/api/2.0/mlflow/experiments/create", admin,
                                 "POST", {"name": name})  # fmt: skip
        _granted_or_fail(settings, status, found, f"experiment '{name}'")
        body = json.loads(found)
        ident = body.get("experiment_id") or body["experiment"]["experiment_id"]
        resources.append(("experiment", ident, f"experiment '{name}'"))
    for name in settings.models:
        status, found = _api(settings.url, "/api/2.0/mlflow/registered-models/get?" +
                             urlencode({"name": name}), admin, "GET", {})  # fmt: skip
        if status == 404:
            status, found = _api(settings.url, "/api/2.0/mlflow/registered-models/create",
                                 admin, "POST", {"name": name})  # fmt: skip
        _granted_or_fail(settings, status, found, f"registered model '{name}'")
        resources.append(("registered_model", name, f"registered model '{name}'"))
    for user, permission in settings.grants.items():
        for kind, ident, what in resources:
            body = {"username": user, "resource_type": kind, "resource_id": ident,
                    "permission": permission}  # fmt: skip
            status, message = _api(settings.url, "/api/3.0/mlflow/users/permissions/grant",
                                   admin, "POST", body)  # fmt: skip
            _granted_or_fail(settings, status, message, f"{permission} for '{user}' on {what}")


def _granted_or_fail(settings: ServerSettings, status: int, message: str, what: str) -> None:
    if status != 200:
        line = message.splitlines()[0] if message.strip() else f"HTTP {status}"
        raise PipelineError(f"MLflow server {settings.url}: cannot set up {what}: {line[:200]}")


def serve(env: Mapping[str, str], root: Path) -> int:
    """Run the server in the foreground until it exits or this process is told to stop.

    IMGPIPE_SERVER_READY_FILE, when set, is created once the server answers and its users
    exist (``up`` waits for it: /health answers before the users are there).
    """
    settings = ServerSettings.from_env(env, root)
    preflight(settings, env)
    # SIGTERM (stack-down, a container stop) unwinds like Ctrl-C: the finally blocks below
    # stop the server and remove the auth file.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with auth_config_file(settings) as auth:
        proc = subprocess.Popen(server_command(settings), env=server_env(settings, env, auth))
        try:
            wait_healthy(settings.url, proc, None, START_TIMEOUT_S)
            if settings.admin_user:
                create_users(settings, env["MLFLOW_AUTH_ADMIN_PASSWORD"])
            if ready := env.get("IMGPIPE_SERVER_READY_FILE"):
                Path(ready).touch()
            print(f"MLflow server on {settings.url}", file=sys.stderr, flush=True)
            return proc.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
