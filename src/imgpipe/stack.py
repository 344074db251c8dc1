"""The team's servers: the MLflow server (embedded store, or the team's PostgreSQL database
with proxied artifacts in S3-compatible storage, optionally behind basic authentication),
and a local stack of all three on 127.0.0.1 to try it.

    python -m imgpipe.stack server   # `make mlflow-server`, in the foreground
    python -m imgpipe.stack up       # `make stack-up`: object server + database + MLflow
    python -m imgpipe.stack env      # `make stack-env`: the environment to `source` again
    python -m imgpipe.stack down     # `make stack-down`: stop what `up` started

The server reads its settings from the environment, never from a command line or a file
in git, so passwords stay out of `ps`, shell history and the repository:
  MLFLOW_BACKEND_STORE   database URL (postgresql://...); unset: <project>/mlruns/mlflow.db
  MLFLOW_ARTIFACTS       s3://bucket/prefix: proxied artifacts, clients need no S3 keys
                         (the server needs MLFLOW_S3_ENDPOINT_URL and AWS_* keys)
  MLFLOW_AUTH_ADMIN_PASSWORD   switches on basic authentication (admin: MLFLOW_AUTH_ADMIN_USERNAME,
                         default admin); IMGPIPE_MLFLOW_USERS="alice:pw1 bob:pw2" adds users
  MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS   127.0.0.1, 5000, 1
The stack keeps its state (object store, logs, pids, the env file) under IMGPIPE_STACK_DIR
(default .stack/, ignored by git) and only ever stops processes it recorded there.
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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from imgpipe.atomic import atomic_file
from imgpipe.errors import PipelineError
from imgpipe.redact import redact_text, redact_url

DEFAULT_BUCKET = "imgpipe"
DEFAULT_DATABASE = "imgpipe_mlflow"
# Team members train into shared experiments: with MLflow's default (READ) a user could not
# log a run into an experiment a colleague created.
DEFAULT_PERMISSION = "EDIT"
START_TIMEOUT_S = 120.0
MIN_PASSWORD = 12  # MLflow's basic auth refuses shorter passwords


def _bin(name: str) -> str:
    """A tool of the environment this interpreter runs in (mlflow, weed), else from PATH."""
    own = Path(sys.executable).parent / name
    return str(own) if own.exists() else name


# --------------------------------------------------------------------------- the MLflow server


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
        for item in env.get("IMGPIPE_MLFLOW_USERS", "").split():
            name, sep, password = item.partition(":")
            if not (sep and name and password):
                raise PipelineError(
                    f"IMGPIPE_MLFLOW_USERS: '{name}' is not user:password (space-separated entries)"
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
            port=_int(env, "MLFLOW_PORT", 5000),
            workers=_int(env, "MLFLOW_WORKERS", 1),
            backend_store=store,
            artifacts=artifacts or str(root / "mlruns" / "artifacts"),
            proxied=bool(artifacts),
            admin_user=(env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin") if auth else None,
            auth_database=env.get("MLFLOW_AUTH_DATABASE_URI")
            or f"sqlite:///{root / 'mlruns' / 'basic_auth.db'}",
            users=users,
        )


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key) or str(default)
    try:
        return int(value)
    except ValueError:
        raise PipelineError(f"{key}={value!r} is not a number") from None


def server_command(settings: ServerSettings) -> list[str]:
    """The `mlflow server` command line: no store URL and no password on it (they go through
    the environment, see ``server_env``), so `ps` never shows a secret."""
    return [
        _bin("mlflow"),
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
    """One call of MLflow's auth API as ``auth`` (user, password): status and message."""
    token = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if method != "GET" else None,
        method=method,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, ""
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


# --------------------------------------------------------------------------- the local stack


def stack_dir(env: Mapping[str, str], root: Path) -> Path:
    return Path(env.get("IMGPIPE_STACK_DIR") or root / ".stack").resolve()


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: each socket stays bound until all are picked,
    so the kernel cannot hand out one twice."""
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def database_url(env: Mapping[str, str]) -> str:
    """IMGPIPE_STACK_DATABASE_URL, else the machine's PostgreSQL from the PG* variables,
    database IMGPIPE_STACK_DATABASE (default imgpipe_mlflow)."""
    if url := env.get("IMGPIPE_STACK_DATABASE_URL"):
        return url
    user = env.get("PGUSER") or "postgres"
    password = env.get("PGPASSWORD")
    auth = user + (f":{password}" if password else "")
    host = env.get("PGHOST") or "127.0.0.1"
    port = env.get("PGPORT") or "5432"
    name = env.get("IMGPIPE_STACK_DATABASE") or DEFAULT_DATABASE
    return f"postgresql://{auth}@{host}:{port}/{name}"


def ensure_database(url: str) -> bool:
    """Create the URL's PostgreSQL database when missing; True when it was created."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit((parts.scheme.split("+")[0], parts.netloc, "/postgres", "", ""))
    try:
        with psycopg.connect(maintenance, autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return False
            conn.execute(f'CREATE DATABASE "{name}"')
            return True
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(
            f"database {redact_url(url)}: cannot reach the server to create it: "
            f"{redact_text(reason, url)}"
        ) from None


def _alive(pid: int | None, started: str | None) -> bool:
    """Whether ``pid`` is still the process we started (same start time: no reused pid)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and fields[19] == started


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _spawn(cmd: list[str], env: Mapping[str, str], log: Path) -> dict[str, object]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stack-down stops it and its children
        )  # fmt: skip
    return {"pid": proc.pid, "started": _start_time(proc.pid)}


def _kill_group(entry: Mapping[str, object], grace: float) -> None:
    pid, started = int(entry["pid"]), str(entry["started"])  # type: ignore[arg-type]
    if not _alive(pid, started):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid, started):  # SeaweedFS takes over 12 s to stop on SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while _alive(pid, started):
            time.sleep(0.05)


def _write_private(path: Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


def _s3_ready(
    endpoint: str, keys: Mapping[str, str], proc_entry: Mapping[str, object], log: Path
) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions

    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=keys["access"], aws_secret_access_key=keys["secret"],
        # Short reads: a port another program holds may accept and never answer.
        config=botocore.config.Config(
            connect_timeout=2, read_timeout=2, retries={"max_attempts": 1}
        ),
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.list_buckets()
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            if not _alive(int(proc_entry["pid"]), str(proc_entry["started"])):  # type: ignore[arg-type]
                # weed's fatal lines start with F (glog): "F1202 ... bind: address already in use"
                fatal = [ln for ln in log.read_text().splitlines() if ln.startswith("F")]
                why = f": {fatal[-1].split(' ', 3)[-1]}" if fatal else f" (log: {log})"
                raise PipelineError(f"object server {endpoint} exited at start{why}") from None
            if time.monotonic() > deadline:
                raise PipelineError(f"object server {endpoint} did not answer") from None
            time.sleep(0.3)


def ensure_bucket(endpoint: str, keys: Mapping[str, str], bucket: str) -> None:
    import boto3
    import botocore.exceptions

    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=keys["access"], aws_secret_access_key=keys["secret"],
    )  # fmt: skip
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        # A fresh SeaweedFS may answer 500 until a volume is allocated: retry a few times.
        for attempt in range(20):
            try:
                client.create_bucket(Bucket=bucket)
                return
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                if attempt == 19:
                    raise PipelineError(
                        f"object server {endpoint}: cannot create bucket '{bucket}' ({code})"
                    ) from None
                time.sleep(0.5)


def _start_weed(state: dict, folder: Path) -> None:
    ports = state["ports"]
    data = folder / "weed"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        _bin("weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.config={folder / 's3.json'}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # Without these two, the third bucket fails with "No writable volumes" (FACTS.md).
        "-master.volumeSizeLimitMB=64", "-volume.max=200",
        "-master.electionTimeout=1s", "-volume.preStopSeconds=0",
    ]  # fmt: skip
    state["procs"]["weed"] = _spawn(cmd, os.environ, folder / "weed.log")


def _team_env(state: Mapping, env: Mapping[str, str]) -> dict[str, str]:
    """The MLflow server's environment in the stack (its S3 keys stay on the server)."""
    out = {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING_"))}
    out |= {
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(state["ports"]["mlflow"]),
        "MLFLOW_BACKEND_STORE": state["database"],
        "MLFLOW_ARTIFACTS": f"s3://{state['bucket']}/mlflow",
        "MLFLOW_S3_ENDPOINT_URL": state["endpoint"],
        "AWS_ACCESS_KEY_ID": state["keys"]["access"],
        "AWS_SECRET_ACCESS_KEY": state["keys"]["secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{state['folder']}/mlflow/basic_auth.db",
    }
    return out


def env_file(state: Mapping) -> str:
    """The shell lines users `source`: the tracking URL for training, the S3 keys and the
    remote for DVC (MLflow's artifacts go through the server: training needs no keys)."""
    endpoint, bucket = state["endpoint"], state["bucket"]
    lines = [
        "# imgpipe team stack (python -m imgpipe.stack up); source this file",
        f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{state['ports']['mlflow']}",
    ]
    if state.get("admin_user"):
        lines += [
            f"export MLFLOW_TRACKING_USERNAME={state['admin_user']}",
            "# and MLFLOW_TRACKING_PASSWORD: the MLFLOW_AUTH_ADMIN_PASSWORD the stack started with",
        ]
    lines += [
        "# for DVC only (the object server's keys):",
        f"export AWS_ACCESS_KEY_ID={state['keys']['access']}",
        f"export AWS_SECRET_ACCESS_KEY={state['keys']['secret']}",
        "export AWS_DEFAULT_REGION=us-east-1",
        f"export IMGPIPE_DVC_REMOTE_URL=s3://{bucket}/dvc",
        f"export IMGPIPE_DVC_ENDPOINT_URL={endpoint}",
        "# once per clone (kept out of git in .dvc/config.local):",
        "#   dvc remote add --local -d team $IMGPIPE_DVC_REMOTE_URL",
        "#   dvc remote modify --local team endpointurl $IMGPIPE_DVC_ENDPOINT_URL",
    ]
    return "\n".join(lines) + "\n"


def _shown(text: str, state: Mapping) -> str:
    return text.replace(state["keys"]["secret"], "***")


def up(env: Mapping[str, str], root: Path) -> str:
    """Start what is not running; return the message (the env file, secrets hidden)."""
    folder = stack_dir(env, root)
    state_file = folder / "state.json"
    state: dict = json.loads(state_file.read_text()) if state_file.exists() else {}
    procs = state.get("procs", {})
    running = [
        n for n in ("weed", "mlflow") if n in procs and _alive(procs[n]["pid"], procs[n]["started"])
    ]
    if running == ["weed", "mlflow"]:
        health = f"http://127.0.0.1:{state['ports']['mlflow']}/health"
        with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=5):
            return f"stack is already up (state in {folder}): source {folder / 'env'}\n" + _shown(
                env_file(state), state
            )
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    (folder / "mlflow").mkdir(exist_ok=True)
    if not state:
        names = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer",
                 "filer_grpc")  # fmt: skip
        state = {
            "folder": str(folder),
            "ports": dict(zip(names, _free_ports(len(names)), strict=True)),
            "keys": {
                "access": env.get("AWS_ACCESS_KEY_ID") or "imgpipe" + secrets.token_hex(6),
                "secret": env.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(24),
            },
            "bucket": env.get("IMGPIPE_STACK_BUCKET") or DEFAULT_BUCKET,
            "procs": {},
        }
        if env.get("IMGPIPE_STACK_S3_PORT"):
            state["ports"]["s3"] = _int(env, "IMGPIPE_STACK_S3_PORT", 8333)
    state["ports"]["mlflow"] = _int(env, "MLFLOW_PORT", state["ports"].get("mlflow", 5000))
    state["database"] = database_url(env)
    state["endpoint"] = f"http://127.0.0.1:{state['ports']['s3']}"
    state["admin_user"] = (
        (env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin")
        if env.get("MLFLOW_AUTH_ADMIN_PASSWORD")
        else None
    )
    identities = {
        "identities": [
            {
                "name": "imgpipe",
                "credentials": [
                    {"accessKey": state["keys"]["access"], "secretKey": state["keys"]["secret"]}
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    _write_private(folder / "s3.json", json.dumps(identities))
    created = ensure_database(state["database"])
    procs = state["procs"]
    try:
        if not ("weed" in procs and _alive(procs["weed"]["pid"], procs["weed"]["started"])):
            _start_weed(state, folder)
        _save(state_file, state)
        _s3_ready(state["endpoint"], state["keys"], procs["weed"], folder / "weed.log")
        ensure_bucket(state["endpoint"], state["keys"], state["bucket"])
        if not ("mlflow" in procs and _alive(procs["mlflow"]["pid"], procs["mlflow"]["started"])):
            server_env_ = _team_env(state, env)
            settings = ServerSettings.from_env(server_env_, root)
            preflight(settings, server_env_)
            ready = folder / "mlflow" / "ready"
            ready.unlink(missing_ok=True)
            server_env_["IMGPIPE_SERVER_READY_FILE"] = str(ready)
            procs["mlflow"] = _spawn(
                [sys.executable, "-m", "imgpipe.stack", "server"],
                server_env_,
                folder / "mlflow.log",
            )
            _save(state_file, state)
            _wait_ready(ready, procs["mlflow"], folder / "mlflow.log")
    except PipelineError:
        _save(state_file, state)  # stack-down can still stop what did start
        raise
    _write_private(folder / "env", env_file(state))
    made = f"created database {redact_url(state['database'])}\n" if created else ""
    return f"{made}stack is up (state in {folder}): source {folder / 'env'}\n" + _shown(
        env_file(state), state
    )


def _wait_ready(ready: Path, entry: Mapping, log: Path) -> None:
    """Until the server process made ``ready``; its one ``error:`` line if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        if not _alive(int(entry["pid"]), str(entry["started"])):
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith("error: ")]
            raise PipelineError(
                lines[-1].removeprefix("error: ") if lines else f"MLflow server exited (log: {log})"
            )
        if time.monotonic() > deadline:
            raise PipelineError(f"MLflow server did not answer in time (log: {log})")
        time.sleep(0.3)


def _save(path: Path, state: Mapping) -> None:
    _write_private(path, json.dumps(state, indent=1))


def down(env: Mapping[str, str], root: Path) -> str:
    folder = stack_dir(env, root)
    state_file = folder / "state.json"
    if not state_file.exists():
        return f"no stack recorded in {folder}: nothing to stop"
    state = json.loads(state_file.read_text())
    stopped = []
    for name in ("mlflow", "weed"):
        entry = state.get("procs", {}).get(name)
        if entry and _alive(entry["pid"], entry["started"]):
            _kill_group(entry, grace=15 if name == "mlflow" else 3)
            stopped.append(name)
    state["procs"] = {}
    _save(state_file, state)
    (folder / "env").unlink(missing_ok=True)
    return f"stopped {', '.join(stopped) or 'nothing (not running)'}; data kept in {folder}"


def show_env(env: Mapping[str, str], root: Path) -> str:
    path = stack_dir(env, root) / "env"
    if not path.exists():
        raise PipelineError(f"{path}: the stack is not up (make stack-up)")
    return path.read_text()


def main(argv: list[str] | None = None) -> int:
    from imgpipe.cli import fail

    args = sys.argv[1:] if argv is None else argv
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    commands = {"server", "up", "down", "env"}
    if len(args) != 1 or args[0] not in commands:
        print("usage: python -m imgpipe.stack server|up|down|env", file=sys.stderr)
        return 2
    try:
        if args[0] == "server":
            return serve(os.environ, root)
        out = {"up": up, "down": down, "env": show_env}[args[0]](os.environ, root)
    except PipelineError as exc:
        fail(exc)
    print(out, end="" if out.endswith("\n") else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
