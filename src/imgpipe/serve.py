"""``make serve``: the model behind an HTTP endpoint (FastAPI under uvicorn, one worker).

    make serve                                   # the champion, else models/model.pt, on 127.0.0.1:8000
    make serve MODEL=models:/digits@champion SERVE_PORT=9000
    curl --data-binary @cat.png -H 'Content-Type: image/png' http://127.0.0.1:8000/predict
    curl -F file=@cat.png http://127.0.0.1:8000/predict

    POST /predict   an image, as the raw body (Content-Type image/png, image/jpeg, image/webp,
                    image/bmp, or application/octet-stream: the content says which) or as
                    the file of a multipart form -> {prediction, probability, top_k, model}
    GET  /health    alive;  GET /ready  the model is loaded;  GET /model  what is served

The model is loaded and checked (``inference.load_classifier``: digests) before the server
listens, so a model that fails its check never serves. An upload is read into memory up to
``max_bytes`` (413 past it) and never written to disk: multipart forms are parsed here from
memory, not by Starlette's form parser, which spools large parts into temp files. Each
image goes through ``process_data``'s rules (extension or declared type names the decoder,
content checked against it, pixel budget before decoding, the model's resize rule). Every
mistake of the client is a 4xx whose body is one line, ``{"error": "..."}``; never a 500.

One worker process: the forward pass runs on a thread pool, and several uvicorn workers
would each hold the model and leave Nagle's algorithm on (FACTS.md: uvicorn #3149).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

# At module level: FastAPI resolves the handlers' annotations from this module's names.
from starlette.requests import Request

from imgpipe.errors import PipelineError
from imgpipe.inference import Classifier, ModelSource

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 << 20
# The types an upload may declare, and the decoder each names (data.files.IMAGE_FORMATS).
CONTENT_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "application/octet-stream": None,  # the content's signature says which
}


class ClientError(Exception):
    """A request the client got wrong: its status and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    classifier: Classifier,
    source: ModelSource,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    top_k: int = 3,
) -> Any:
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="imgpipe", docs_url=None, redoc_url=None, openapi_url=None)
    model_json = {"uri": source.uri, "name": source.name, "version": source.version}

    @app.exception_handler(ClientError)
    async def client_error(_: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        return {"ready": True, "model": model_json}

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return {"source": source.as_json(), "max_bytes": max_bytes} | classifier.describe()

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        body = await read_body(request, max_bytes)
        data, fmt, name = parse_upload(request.headers.get("content-type", ""), body)
        try:
            answer = await run_in_threadpool(classify, classifier, data, fmt, name, top_k)
        except PipelineError as exc:
            raise ClientError(422, str(exc)) from None
        return answer | {"model": model_json}

    return app


def classify(classifier: Classifier, data: bytes, fmt: str | None, name: str, k: int) -> dict:
    import numpy as np

    row = classifier.prepare_upload(data, fmt, name)
    (answer,) = classifier.answers(classifier.probabilities(np.expand_dims(row, 0)), k)
    return answer.as_json()


async def read_body(request: Any, max_bytes: int) -> bytes:
    """The body, in memory, refused past ``max_bytes`` before more is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ClientError(413, f"upload of {int(declared)} bytes is over the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ClientError(413, f"upload is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise ClientError(400, "empty body: send an image (raw body or a multipart file)")
    return body


_PLAIN_NAME = re.compile(r"^[^/\\\x00]+$")


def parse_upload(content_type: str, body: bytes) -> tuple[bytes, str | None, str]:
    """(image bytes, declared format or None, a name for messages) from a raw body or a
    multipart form's first file."""
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type)
    kind = kind.decode("latin-1").lower()
    if kind == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise ClientError(400, "multipart/form-data without a boundary")
        return _form_file(body, boundary)
    if kind not in CONTENT_TYPES:
        raise ClientError(
            415,
            f"content type {kind or '(none)'!r} is not an image: send "
            f"{', '.join(sorted(CONTENT_TYPES))} or multipart/form-data",
        )
    return body, CONTENT_TYPES[kind], "upload"


def _form_file(body: bytes, boundary: bytes) -> tuple[bytes, str | None, str]:
    """The first part with a file name, parsed from memory (python-multipart's parser)."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    parts: list[dict[str, Any]] = []
    field: list[bytes] = []
    value: list[bytes] = []

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": []})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.append(data[start:end])

    def on_header_end() -> None:
        parts[-1]["headers"][b"".join(field).lower()] = b"".join(value)
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ClientError(400, f"malformed multipart form ({str(exc).splitlines()[0]})") from None
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        filename = disposition.get(b"filename")
        if filename is None:
            continue
        name = filename.decode("utf-8", "replace")
        if not _PLAIN_NAME.match(name) or name in (".", "..") or ".." in name.split("."):
            raise ClientError(400, f"file name {name!r} must be a plain name, without folders")
        declared, _ = parse_options_header(part["headers"].get(b"content-type", b""))
        kind = declared.decode("latin-1").lower()
        if kind and kind not in CONTENT_TYPES:
            raise ClientError(415, f"file {name!r}: content type {kind!r} is not an image")
        fmt = CONTENT_TYPES.get(kind)
        if fmt is None:  # no type, or octet-stream: the name's extension, else the content
            from imgpipe.data.files import image_format

            fmt = image_format(name)
        return b"".join(part["data"]), fmt, name
    raise ClientError(400, "multipart form without a file: send the image as a file field")


def serve(
    classifier: Classifier,
    source: ModelSource,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_bytes: int = DEFAULT_MAX_BYTES,
    top_k: int = 3,
) -> None:
    """Listen until SIGTERM/SIGINT (uvicorn's own handling: a graceful stop)."""
    import uvicorn

    app = create_app(classifier, source, max_bytes=max_bytes, top_k=top_k)
    log.info("serving %s on http://%s:%d (POST /predict)", source.uri, host, port)
    config = uvicorn.Config(
        app, host=host, port=port, workers=1, log_config=None, access_log=False,
        server_header=False,
    )  # fmt: skip
    uvicorn.Server(config).run()


def run_serve(cfg: Any) -> None:
    """``make serve`` as configured (``config.PredictConfig``): ``serve_model``, else the
    champion of ``mlflow_registered_model_name`` when it has one, else models/model.pt."""
    from imgpipe.compose import load_stage_config
    from imgpipe.inference import load_classifier

    train = load_stage_config("train_model")
    model = cfg.serve_model or _default_model(train)
    classifier, source = load_classifier(
        model, train.mlflow_tracking_uri, cfg.predict_max_image_pixels
    )
    serve(
        classifier,
        source,
        host=cfg.serve_host,
        port=cfg.serve_port,
        max_bytes=cfg.serve_max_bytes,
        top_k=cfg.predict_top_k,
    )


def _default_model(train: Any) -> str:
    """The champion of the registered name when the store has one, else models/model.pt.
    Only "no such model or alias" falls back: a tracking server that is down or refuses
    is one line, never a silent switch to another model."""
    fallback = str(Path(train.model_checkpoint_dir_path) / "model.pt")
    name = train.mlflow_registered_model_name
    if not name:
        return fallback
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from imgpipe.tracking.store import (
        check_tracking_uri,
        hide_secret_urls,
        prepare_store,
        registry_errors,
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(train.mlflow_tracking_uri)
    check_tracking_uri(uri)
    prepare_store(uri)
    hide_secret_urls(uri)
    champion = f"models:/{name}@champion"
    with registry_errors(uri, champion):
        try:
            MlflowClient(uri).get_model_version_by_alias(name, "champion")
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            log.info("model %r has no champion: serving %s", name, fallback)
            return fallback
    return champion
