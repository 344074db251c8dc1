"""The harness the tests and the bench share, as ``click.testing`` is click's.

    from imgpipe.testing import FaultProxy, copy_project, make, mlflow_server, run_script
    from imgpipe.testing import train_config

    with mlflow_server(tmp / "server") as server:       # a real `mlflow server` on loopback
        run_script("train_model.py", f"mlflow_tracking_uri={server.url}", cwd=tmp)
    project = copy_project(tmp / "project")             # the checkout as a fresh git repo
    make("data", project)                               # make/dvc there with this venv
    cfg = train_config(data, tmp / "run", epochs=2)     # every output under tmp/run
    with FaultProxy(5432) as db:                        # PostgreSQL, as a test breaks it
        db.drop(3.0)                                    # ... restarting

It drives the project from its source checkout (``REPO``, the editable install's root)
and the virtual environment running it (``VENV``); nothing in the pipeline imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from imgpipe.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


# --------------------------------------------------------------------------- entry points


def entry_point(script: str) -> list[str]:
    """The command line that runs ``src/<script>`` as a user would, with this interpreter."""
    return [sys.executable, "-u", str(REPO / "src" / script)]


def run_script(
    script: str,
    *overrides: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run one of the project's entry points exactly as a user would."""
    return _run([*entry_point(script), *overrides], cwd, {**os.environ, **(env or {})}, timeout)


def _run(
    cmd: list[str], cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# --------------------------------------------------------------------------- a small training run


def run_outputs(root: Path) -> dict[str, str]:
    """The config values that put a training run's checkpoints, dvclive files and logs
    under ``root``."""
    return {
        "model_checkpoint_dir_path": str(root / "models"),
        "live_dir_path": str(root / "dvclive"),
        "log_dir": str(root / "logs"),
    }


def train_config(
    data: Path, root: Path, *, store: Path | None = None, **changes: object
) -> TrainConfig:
    """A training config on the processed ``data`` with every output under ``root``; its
    SQLite store is ``root/store/mlflow.db`` unless ``store`` names one runs share (either
    way an ``empty_store`` when it does not exist yet and MLflow is on)."""
    db = store or root / "store" / "mlflow.db"
    if changes.get("setup_mlflow", True) and "mlflow_tracking_uri" not in changes:
        empty_store(db)
    values = {
        "data_dir_path": str(data),
        "mlflow_tracking_uri": f"sqlite:///{db}",
        **run_outputs(root),
    }
    return TrainConfig(**(values | changes))


_template: Path | None = None


def empty_store(path: Path) -> Path:
    """An empty MLflow SQLite store at ``path`` unless one is there: a copy of one this
    process made once. MLflow makes a new store by running every alembic migration, seconds
    of CPU each time; the tests that are about making a store (a project's first run, the
    race of two processes on a new store) leave the path to the pipeline instead."""
    global _template
    if path.exists():
        return path
    if _template is None or not _template.exists():
        from imgpipe.tracking.store import create_sqlite_store_once

        made = Path(tempfile.mkdtemp(prefix="imgpipe-empty-store-")) / "mlflow.db"
        create_sqlite_store_once(f"sqlite:///{made}", made)
        atexit.register(shutil.rmtree, made.parent, ignore_errors=True)
        _template = made
    path.parent.mkdir(parents=True, exist_ok=True)
    copying = path.with_name(f".{path.name}.{os.getpid()}.copy")
    shutil.copyfile(_template, copying)
    os.replace(copying, path)  # never a half-copied store under the name
    return path


# --------------------------------------------------------------------------- mlflow server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def mlflow_server(
    root: Path,
    *,
    workers: int | None = 1,
    env: Mapping[str, str] | None = None,
    store: str | None = None,
    artifacts: Path | None = None,
    start_timeout: float = 120,
) -> Iterator[Server]:
    """A real `mlflow server` on a free loopback port, stopped on exit.

    ``root`` holds its log (``server.log``) and, unless ``store`` (a backend store URI) and
    ``artifacts`` say otherwise, its SQLite store and artifacts. ``workers=1`` is how
    `make mlflow-server` starts it, ``None`` leaves MLflow's default; ``env`` is added to
    this process's environment.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = server_command(port, root, workers=workers, store=store, artifacts=artifacts)
    full_env = server_env(env)
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=full_env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, proc, root / "server.log", start_timeout)
            yield Server(url, proc.pid)
        finally:
            stop(proc)


def server_command(
    port: int,
    root: Path,
    *,
    workers: int | None = 1,
    store: str | None = None,
    artifacts: Path | None = None,
) -> list[str]:
    """The `mlflow server` command line on 127.0.0.1:``port``, its store under ``root``
    (an ``empty_store`` put there first unless ``store`` names another)."""
    return [
        str(VENV / "bin" / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(["--workers", str(workers)] if workers else []),
        "--backend-store-uri",
        store or f"sqlite:///{empty_store(root / 'mlflow.db')}",
        "--default-artifact-root",
        str(artifacts or root / "artifacts"),
    ]


def server_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    # As `make mlflow-ui` starts it: no GenAI job runner (8 idle processes on 2 cores).
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until the server ``proc`` started answers ``url``/health; raise with the tail of
    its ``log`` when it exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start: {log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- a server failing


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of a server on 127.0.0.1:``target_port``
    (PostgreSQL, `mlflow server`, an object store) that a test breaks and mends while its
    clients use it; each mode applies at once, to open connections too:

        forward()                  relay both ways (the start)
        drop(seconds=None)         what a restart looks like: every open connection is cut
                                   and new ones are refused, until forward() or ``seconds``
        stall()                    hold every byte both ways, on open and new connections
        lose_answers(marker, n=1)  HTTP: the next n requests whose first line holds
                                   ``marker`` reach the server, and their connection is
                                   closed before the answer reaches the client
        on_request(marker, action) HTTP: ``action()`` runs once, just before the first
                                   such request is forwarded

    Clients connect to ``port`` (``url`` for HTTP). ``close()``, or the end of its ``with``
    block, closes every socket and stops its threads.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # accept() notices close() within 0.1 s
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.drops = 0  # how many times drop() was called
        self.lost: list[bytes] = []  # the first lines of the requests whose answers were lost
        self._mode = "forward"
        self._down_until = math.inf
        self._lose: dict[bytes, int] = {}
        self._before: dict[bytes, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._relays: list[threading.Thread] = []
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forward(self) -> None:
        self._mode = "forward"

    def drop(self, seconds: float | None = None) -> None:
        with self._lock:
            self._mode = "drop"
            self._down_until = math.inf if seconds is None else time.monotonic() + seconds
            self.drops += 1
            pairs = list(self._pairs)
        for pair in pairs:
            _shut(*pair)

    def stall(self) -> None:
        self._mode = "stall"

    def lose_answers(self, marker: bytes, n: int = 1) -> None:
        with self._lock:
            self._lose[marker] = self._lose.get(marker, 0) + n

    def on_request(self, marker: bytes, action: Callable[[], None]) -> None:
        with self._lock:
            self._before[marker] = action

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(timeout=5)  # no new pair after this
        with self._lock:
            pairs, relays = list(self._pairs), list(self._relays)
        for pair in pairs:
            _shut(*pair)
        for relay in relays:
            relay.join(timeout=5)
        self._listener.close()

    def mode(self) -> str:
        if self._mode == "drop" and time.monotonic() >= self._down_until:
            self._mode = "forward"
        return self._mode

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            if self.mode() == "drop":
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the server itself is down: the client sees that
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._pairs.add((client, upstream))
                relay = threading.Thread(target=self._relay, args=(client, upstream), daemon=True)
                self._relays = [t for t in self._relays if t.is_alive()] + [relay]
            relay.start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        request_starts = True  # the client's next bytes begin an HTTP request
        losing = False  # the request sent is one whose answer is lost
        try:
            while not self._closed.is_set():
                if self.mode() == "stall":
                    time.sleep(0.05)  # the bytes wait in the kernel's buffers
                    continue
                for key, _ in sel.select(timeout=0.1):
                    if self.mode() == "stall":
                        break
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is client and request_starts:
                        losing = self._request(data.split(b"\r\n", 1)[0])
                    elif key.fileobj is upstream and losing:
                        return  # the server acted and answered; the client never hears it
                    request_starts = key.fileobj is upstream
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                self._pairs.discard((client, upstream))
            _shut(client, upstream)
            client.close()
            upstream.close()

    def _request(self, first_line: bytes) -> bool:
        """Run the actions waiting for this request; whether its answer is to be lost."""
        with self._lock:
            actions = [self._before.pop(m) for m in list(self._before) if m in first_line]
            marker = next((m for m, n in self._lose.items() if n and m in first_line), None)
            if marker is not None:
                self._lose[marker] -= 1
                self.lost.append(first_line)
        for action in actions:
            action()
        return marker is not None


def _shut(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- project copy


def copy_project(dest: Path) -> Path:
    """Copy the project's files (tracked and new, never ignored ones) into a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    # dvc exp run commits internally: the copy needs an identity of its own.
    subprocess.run(["git", "config", "user.name", "imgpipe tests"], cwd=dest, check=True)
    subprocess.run(["git", "config", "user.email", "tests@imgpipe.invalid"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def project_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for make/dvc in a project copy: this interpreter's virtual environment,
    used as it is (SETUP empty), so a copy never reinstalls the package into it; stages run
    locally unless the caller asks for a container runtime."""
    return {**os.environ, "VENV": str(VENV), "SETUP": "", "RUNTIME": "local", **(env or {})}


def make(
    target: str,
    cwd: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """`make TARGET` in a project copy."""
    return _run(["make", "--no-print-directory", target, *args], cwd, project_env(env), timeout)


def dvc(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in a project copy."""
    return _run([str(VENV / "bin" / "dvc"), *args], cwd, project_env(env), timeout)
