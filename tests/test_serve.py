"""`imgpipe serve` as a real uvicorn process on 127.0.0.1, asked with a real HTTP client:
images answer with the class, hostile uploads are a 4xx with one line (never a 500) and
/health stays up, and 8 clients at once get the answers one client gets."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe.testing import free_port, train_config

pytestmark = pytest.mark.slow

MAX_BYTES = 200_000


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def start_server(model: Path, root: Path, port: int) -> tuple[subprocess.Popen, str]:
    """`imgpipe serve` of ``model`` on ``port``, its log in ``root``; (process, URL) once
    /ready answers 200."""
    import httpx

    log = open(root / "server.log", "a")  # noqa: SIM115 - the child holds it; closed here
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "imgpipe", "serve", f"serve_model={model}",
            f"serve_port={port}", f"serve_max_bytes={MAX_BYTES}", f"log_dir={root / 'logs'}",
        ],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
    )  # fmt: skip
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "server never answered /ready"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(sample_processed: Path, sample_raw: Path, tmp_path_factory: pytest.TempPathFactory):
    from imgpipe.train import train

    root = tmp_path_factory.mktemp("serve")
    cfg = train_config(sample_processed, root, epochs=1, setup_mlflow=False)
    train(cfg)
    model = Path(cfg.model_checkpoint_dir_path) / "model.pt"
    proc, url = start_server(model, root, free_port())
    yield {"url": url, "raw": sample_raw, "log": root / "server.log", "model": model}
    proc.terminate()
    proc.wait(30)
    assert "Traceback" not in (root / "server.log").read_text()


def test_an_image_is_classified_as_raw_body_and_as_multipart(server) -> None:
    import httpx

    image = sorted((server["raw"] / "test" / "3").iterdir())[0]
    data = image.read_bytes()
    raw = httpx.post(
        f"{server['url']}/predict", content=data, headers={"Content-Type": "image/png"}
    )
    assert raw.status_code == 200, raw.text
    answer = raw.json()
    assert answer["prediction"] in [str(d) for d in range(10)]
    assert 0 < answer["probability"] <= 1 and len(answer["top_k"]) == 3
    assert answer["model"]["uri"].endswith("model.pt")
    form = httpx.post(f"{server['url']}/predict", files={"file": (image.name, data, "image/png")})
    assert form.status_code == 200 and form.json()["prediction"] == answer["prediction"]
    assert httpx.get(f"{server['url']}/ready").json()["ready"] is True
    described = httpx.get(f"{server['url']}/model").json()
    assert described["architecture"] == "convnet" and len(described["classes"]) == 10


def _bomb() -> bytes:
    """A PNG whose header declares 10000x10000 pixels, over the budget (about 100 KB)."""
    out = io.BytesIO()
    Image.new("L", (10000, 10000)).save(out, format="PNG", compress_level=9)
    return out.getvalue()


BAD = [
    pytest.param({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, id="empty-body"),
    pytest.param(
        {"content": os.urandom(500), "headers": {"Content-Type": "application/octet-stream"}},
        422,
        id="random-bytes",
    ),
    pytest.param(
        {"content": "truncated", "headers": {"Content-Type": "image/png"}}, 422, id="truncated-png"
    ),
    pytest.param(
        {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, id="wrong-type"
    ),
    pytest.param({"content": "rgb", "headers": {"Content-Type": "image/png"}}, 422, id="rgb"),
    pytest.param({"content": "big", "headers": {"Content-Type": "image/png"}}, 422, id="size"),
    pytest.param({"content": "bomb", "headers": {"Content-Type": "image/png"}}, 422, id="bomb"),
    pytest.param(
        {"content": b"\0" * (MAX_BYTES + 1), "headers": {"Content-Type": "image/png"}},
        413,
        id="over-limit",
    ),
    pytest.param({"files": "dotdot"}, 400, id="dotdot-filename"),
]


@pytest.mark.parametrize(("request_kw", "status"), BAD)
def test_hostile_uploads_are_a_4xx_with_one_line(server, request_kw: dict, status: int) -> None:
    import httpx

    good = sorted((server["raw"] / "test" / "3").iterdir())[0].read_bytes()
    made = {
        "truncated": good[: len(good) // 2],
        "rgb": png(np.zeros((8, 8, 3), np.uint8)),
        "big": png(np.zeros((16, 16), np.uint8)),
        "bomb": _bomb(),
    }
    kw = dict(request_kw)
    if isinstance(kw.get("content"), str):
        kw["content"] = made[kw["content"]]
    if kw.get("files") == "dotdot":
        kw["files"] = {"file": ("../../etc/x.png", good, "image/png")}
    response = httpx.post(f"{server['url']}/predict", timeout=30, **kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error and "\n" not in error and "Traceback" not in error
    assert httpx.get(f"{server['url']}/health").status_code == 200


def test_eight_clients_at_once_get_the_sequential_answers(server) -> None:
    import httpx

    images = [p.read_bytes() for p in sorted((server["raw"] / "test").rglob("*.png"))[:50]]
    headers = {"Content-Type": "image/png"}

    def ask(client: httpx.Client) -> list[tuple[str, float]]:
        out = []
        for data in images:
            answer = client.post(f"{server['url']}/predict", content=data, headers=headers)
            assert answer.status_code == 200, answer.text
            out.append((answer.json()["prediction"], answer.json()["probability"]))
        return out

    with httpx.Client(timeout=60) as client:
        sequential = ask(client)
    clients = [httpx.Client(timeout=60) for _ in range(8)]
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, clients))
    finally:
        for client in clients:
            client.close()
    assert all(answers == sequential for answers in together)


def test_a_server_killed_under_load_fails_requests_and_a_restart_serves_again(
    server, tmp_path: Path
) -> None:
    """SIGKILL while 4 clients keep asking: they get connection errors, never a wrong or
    failed answer, and the same command started again serves the same answers."""
    import httpx

    image = sorted((server["raw"] / "test").rglob("*.png"))[0].read_bytes()
    headers = {"Content-Type": "image/png"}
    expected = httpx.post(f"{server['url']}/predict", content=image, headers=headers).json()
    port = free_port()
    proc, url = start_server(server["model"], tmp_path, port)
    answers: list[tuple[int, str]] = []
    errors: list[str] = []
    done = threading.Event()

    def ask() -> None:
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                try:
                    r = client.post(f"{url}/predict", content=image, headers=headers)
                except httpx.TransportError as exc:
                    errors.append(type(exc).__name__)
                    time.sleep(0.05)
                    continue
                answers.append((r.status_code, r.json().get("prediction", r.text)))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while len(answers) < 40:
            assert all(t.is_alive() for t in threads)
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
        while len(errors) < 8:  # every client notices
            time.sleep(0.05)
        before = len(answers)
        proc, _ = start_server(server["model"], tmp_path, port)
        while len(answers) < before + 40:
            time.sleep(0.05)
    finally:
        done.set()
        for t in threads:
            t.join(30)
        proc.terminate()
        proc.wait(30)
    assert set(answers) == {(200, expected["prediction"])}
    assert set(errors) <= {"ConnectError", "ReadError", "RemoteProtocolError", "WriteError"}
