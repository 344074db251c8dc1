# imgpipe: `make` lists the targets. Two commands set everything up from nothing:
#   make run    the pipeline (dvc repro) on the sample data
#   make test   the test suite
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= $(shell command -v python3.11 || command -v python3)
# Under `dvc exp run --temp/--queue` the stage runs in a copy of the repository;
# DVC_ROOT names the real one, whose virtual environment we reuse.
VENV ?= $(if $(DVC_ROOT),$(DVC_ROOT)/.venv,.venv)
BIN := $(VENV)/bin
PY := $(BIN)/python
# The stamp's name carries a checksum of pyproject.toml: same file, no reinstall.
DEPS_STAMP := $(VENV)/.deps-$(shell cksum < pyproject.toml | cut -d' ' -f1)
# Targets depend on SETUP; `make SETUP= ...` uses $(VENV) as it is (the tests do,
# so a project copy never reinstalls into the environment that runs them).
SETUP ?= $(DEPS_STAMP)
RAW_DIR ?= data/raw
PARAMS ?= params.yaml
ARGS ?=
WORKERS ?=
BENCH_ARGS ?=
PYTEST_ARGS ?=
MLFLOW_PORT ?= 5000
MLFLOW_HOST ?= 127.0.0.1
# One server worker (it serves requests on threads): with several, uvicorn leaves Nagle's
# algorithm on for the connections on Linux (its issue #3149, open as of 0.54), and each
# request on a kept-alive connection waits for a delayed ACK (figures: bench/NOTES.md).
MLFLOW_WORKERS ?= 1

# Containers. RUNTIME: docker | podman | local; unset, a stage runs in the image when an
# engine answers and the image is built, else locally (the choice is printed).
# GPU: empty (CPU) | nvidia | amd. The machinery behind them is in make/containers.mk.
RUNTIME ?=
GPU ?=
DOCKER ?= docker
PODMAN ?= podman
IMAGE_NAME ?= imgpipe
REGISTRY ?=
BASE_IMAGE ?=
TORCH_INDEX_URL ?=
include make/containers.mk

# No usage telemetry leaves the machine unless the user asks for it.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true

.PHONY: help setup data params run process-data train sweep build push mlflow-server mlflow-ui \
	mlflow-sync test bench lint params-check format clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(DEPS_STAMP) ## Create .venv and install the pinned dependencies (once per pyproject.toml)

$(DEPS_STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found on PATH" >&2; exit 1; }
	@echo "Installing dependencies into $(VENV) (first run only)..."
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  $(BIN)/pre-commit install >/dev/null || echo "warning: git hook not installed (pre-commit install failed)" >&2; \
	fi
	@rm -f $(VENV)/.deps-*
	@touch $@

data: $(SETUP) ## Materialise the sample digits in data/raw (kept if data/raw exists)
	@if [ -d $(RAW_DIR) ]; then \
	  echo "$(RAW_DIR) exists: kept as it is"; \
	else \
	  $(PY) -m imgpipe.data $(RAW_DIR); \
	  if [ "$(RAW_DIR)" = data/raw ] && git rev-parse --git-dir >/dev/null 2>&1; then \
	    $(BIN)/dvc commit -q -f data.dvc; \
	    if ! git diff --quiet -- data.dvc; then \
	      git checkout -- data.dvc; \
	      echo "warning: the sample export differs from data.dvc (your data?): run \`dvc pull\`" >&2; \
	    fi; \
	  fi; \
	fi

params: $(SETUP) ## Regenerate params.yaml from conf/ (conf/ is the source of truth)
	@$(PY) -m imgpipe.config $(PARAMS)

run: data params ## Run the pipeline: process_data -> train -> sweep (dvc repro)
	$(BIN)/dvc repro

process-data: $(SETUP) ## Stage: raw images -> data/processed (values from params.yaml) [RUNTIME=docker|podman|local]
	@$(STAGE_CHECK)
	$(call stage,process_data.py) $(ARGS)

train: $(SETUP) ## Stage: train the CNN, tracked in MLflow + dvclive [GPU=nvidia|amd]
	@$(STAGE_CHECK)
	$(call stage,train_model.py,gpu) $(ARGS)

sweep: $(SETUP) ## Stage: Optuna sweep (conf/train_model.yaml hydra.sweeper); WORKERS=N trials at once
	@$(STAGE_CHECK)
	$(call stage,train_model.py,gpu) --multirun $(if $(WORKERS),hydra.sweeper.n_jobs=$(WORKERS)) $(ARGS)

build: ## Build the image: imgpipe:cpu, or GPU=nvidia|amd for imgpipe:cuda|rocm
	@$(if $(filter amd,$(GPU)),test -n "$(TORCH_INDEX_URL)" || { echo "error: GPU=amd needs TORCH_INDEX_URL=<PyTorch's ROCm wheel index> (PyPI's torch is built for CUDA)" >&2; exit 2; })
	@$(ENGINE_CHECK)
	@$(BUILDKIT_CHECK)
	@$(link_wheels)
	$(BUILD_ENV) $(BUILD_BIN) build --file $(DOCKERFILE) --tag $(IMAGE) \
	  $(foreach arg,BASE_IMAGE TORCH_INDEX_URL NON_ROOT_USER NON_ROOT_UID NON_ROOT_GID,$(if $($(arg)),--build-arg $(arg)=$($(arg)))) \
	  --label org.opencontainers.image.version=$(VERSION) \
	  --label org.opencontainers.image.revision=$(GIT_SHA) .

push: ## Push the image to REGISTRY=host/namespace, tagged <version>-<variant> and <git sha>-<variant>
	@test -n "$(REGISTRY)" || { echo "error: make push needs REGISTRY=host/namespace" >&2; exit 2; }
	@$(ENGINE_CHECK)
	@$(IMAGE_CHECK)
	@set -e; for tag in $(VERSION)-$(VARIANT) $(GIT_SHA)-$(VARIANT); do \
	  target="$(REGISTRY)/$(IMAGE_NAME):$$tag"; \
	  $(ENGINE_BIN) tag $(IMAGE) "$$target"; \
	  if ! out="$$($(ENGINE_BIN) push "$$target" 2>&1)"; then \
	    echo "error: $(REGISTRY) refused the push of $$target: $$(printf '%s\n' "$$out" | tail -n 1)" >&2; \
	    exit 2; \
	  fi; \
	  echo "pushed $$target"; \
	done

test: data ## Run the test suite (slow end-to-end tests included)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(SETUP) ## Benchmark against baselines and hardware limits -> bench/RESULTS.md (BENCH_ARGS=...)
	$(PY) -u bench/run.py $(BENCH_ARGS)

lint: $(SETUP) ## Every pre-commit hook on every file: ruff, yaml, hadolint, actionlint, params.yaml in sync
	$(BIN)/pre-commit run --all-files --show-diff-on-failure

params-check: $(SETUP) ## Fail when params.yaml differs from what conf/ composes
	$(PY) -m imgpipe.config --check $(PARAMS)

format: $(SETUP) ## Format the code with ruff
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

mlflow-server: $(SETUP) ## MLflow server on the project's store, 127.0.0.1:5000 (MLFLOW_HOST, MLFLOW_PORT); in the image when built
	@mkdir -p mlruns
	@$(SERVER_CHECK)
	$(SERVER_CMD) --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns/artifacts --workers $(MLFLOW_WORKERS) \
	  --host $(if $(filter local,$(SERVER_RUNTIME)),$(MLFLOW_HOST) --port $(MLFLOW_PORT),0.0.0.0 --port 5000)

mlflow-ui: mlflow-server ## Alias of mlflow-server

mlflow-sync: $(SETUP) ## After a tracking outage: log what the MLflow run of models/ lacks (CHECKPOINT_DIR=models)
	$(PY) -m imgpipe.tracking.sync $(or $(CHECKPOINT_DIR),models)

clean: ## Remove caches and logs (keeps data, models, mlruns and .venv)
	rm -rf logs .pytest_cache .ruff_cache outputs multirun
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
