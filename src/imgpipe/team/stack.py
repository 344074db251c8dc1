"""The local team stack on 127.0.0.1, to try the team set-up on one machine: an S3 object
server (SeaweedFS), a PostgreSQL database on the machine's server, and the team MLflow
server on both (``imgpipe.team.server``), each a process this module starts and stops.

    imgpipe stack up       # `make stack-up`: object server + database + MLflow
    imgpipe stack env      # `make stack-env`: the environment to `source` again
    imgpipe stack down     # `make stack-down`: stop what `up` started

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
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from imgpipe.atomic import atomic_file
from imgpipe.errors import PipelineError
from imgpipe.redact import redact_text, redact_url
from imgpipe.team.checks import preflight
from imgpipe.team.server import START_TIMEOUT_S, ServerSettings, env_int, tool

DEFAULT_BUCKET = "imgpipe"
DEFAULT_DATABASE = "imgpipe_mlflow"
# How the stack starts its MLflow server: the `imgpipe stack server` subcommand.
SERVER_COMMAND = [sys.executable, "-m", "imgpipe", "stack", "server"]


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
        tool("weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
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
        "# imgpipe team stack (imgpipe stack up); source this file",
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
            state["ports"]["s3"] = env_int(env, "IMGPIPE_STACK_S3_PORT", 8333)
    state["ports"]["mlflow"] = env_int(env, "MLFLOW_PORT", state["ports"].get("mlflow", 5000))
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
                SERVER_COMMAND,
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
