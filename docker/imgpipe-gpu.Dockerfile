# The project's GPU image: `make build GPU=nvidia` (imgpipe:cuda) or `make build GPU=amd`
# (imgpipe:rocm), then `make train GPU=nvidia` runs a stage in it on the host's GPUs.
# No multi-GB CUDA -devel base: PyPI's torch wheels for Linux bundle the CUDA runtime and
# only need the host's driver (through the NVIDIA container toolkit).
# TORCH_INDEX_URL: another wheel index for torch, e.g. PyTorch's ROCm index for AMD GPUs
# (required with GPU=amd) or one for another CUDA version.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The runtime dependencies, read from pyproject.toml: only a change to them (not to the
# version, the dev tools or the code) reinstalls the dependency layer below.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/pyproject.toml", "rb"))["project"]["dependencies"]))' > /requirements.txt

FROM ${BASE_IMAGE}
ARG NON_ROOT_USER=imgpipe
ARG NON_ROOT_UID=2222
ARG NON_ROOT_GID=2222
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/workspace/src \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --gid "${NON_ROOT_GID}" "${NON_ROOT_USER}" \
    && useradd --uid "${NON_ROOT_UID}" --gid "${NON_ROOT_GID}" --create-home --shell /bin/bash "${NON_ROOT_USER}" \
    && mkdir /workspace \
    && chown "${NON_ROOT_UID}:${NON_ROOT_GID}" /workspace

# Dependencies before the code: a code-only change rebuilds in seconds. The install is
# make setup's: the pinned uv (make/uv.py installs it with pip into a cache mount) from
# requirements.lock (`make lock`: every transitive version; torch's line carries no local
# label, so the build that /wheels or TORCH_INDEX_URL offers installs). docker/wheels/gpu
# holds local wheels you put there (say, a torch for your CUDA version).
# uv's cache persists across builds; it copies from there (a cache mount is another file
# system) and compiles the bytecode once, here, not at every container start. The system CA
# store is trusted (say, a proxy's CA added to the base image).
COPY --from=requirements /requirements.txt /tmp/requirements.txt
COPY requirements.lock /tmp/requirements.lock
COPY make/uv.py /tmp/uv.py
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=cache,target=/root/.cache/imgpipe \
    --mount=type=bind,source=docker/wheels/gpu,target=/wheels \
    python3 -m venv "${VIRTUAL_ENV}" \
    && PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
       UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy \
       python3 /tmp/uv.py pip install --quiet --python "${VIRTUAL_ENV}/bin/python" --find-links /wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} --index-strategy unsafe-best-match \
        -r /tmp/requirements.txt -c /tmp/requirements.lock

WORKDIR /workspace
COPY conf/ conf/
COPY src/ src/
COPY make/ make/
COPY Makefile dvc.yaml params.yaml pyproject.toml ./

USER ${NON_ROOT_UID}:${NON_ROOT_GID}
CMD ["python", "-u", "src/train_model.py"]
