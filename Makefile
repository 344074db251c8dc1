# imgpipe: `make` lists the targets. Two commands set everything up from nothing:
#   make run    the pipeline (dvc repro) on the sample data
#   make test   the test suite
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= $(shell command -v python3.11 || command -v python3)
# Under `dvc exp run --temp/--queue` the stage runs in a copy of the repository;
# DVC_ROOT names the real one, whose virtual environment the copy uses as it is.
VENV ?= $(if $(DVC_ROOT),$(DVC_ROOT)/.venv,.venv)
BIN := $(VENV)/bin
PY := $(BIN)/python
# The stamp's name carries a checksum of pyproject.toml and the lock: same files, no
# reinstall (whatever their dates: DVC's copies and git checkouts write them anew).
DEPS_STAMP := $(VENV)/.deps-$(shell cat pyproject.toml requirements.lock 2>/dev/null | cksum | cut -d' ' -f1)
# In DVC's copy (DVC_ROOT elsewhere) nothing is ever installed: two queued experiments would
# install into one environment at once, and leave its editable install pointing at a copy
# DVC deletes. The copy checks that the environment matches its dependencies, and runs its
# own code (src/ first on the path).
IN_DVC_COPY := $(if $(DVC_ROOT),$(filter-out $(realpath $(DVC_ROOT)),$(realpath $(CURDIR))))
ifneq ($(IN_DVC_COPY),)
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))
endif
# Targets depend on SETUP; `make SETUP= ...` uses $(VENV) as it is (the tests do,
# so a project copy never reinstalls into the environment that runs them).
SETUP ?= $(if $(IN_DVC_COPY),deps-check,$(DEPS_STAMP))
# The installer: uv (UV_VERSION, installed on first use into the user's cache by make/uv.py,
# which hands it pip's configuration), else pip; INSTALLER=pip skips uv.
INSTALLER ?= uv
UV_VERSION ?= 0.13.9
UV = IMGPIPE_UV_VERSION=$(UV_VERSION) $(PYTHON) make/uv.py
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
DASHBOARD_PORT ?= 8080
# make predict / make serve: MODEL= a model.pt or an MLflow model (models:/<name>@<alias>,
# runs:/<run id>/model); unset, predict_model of params.yaml, and for serve the champion
# of mlflow_registered_model_name when there is one, else models/model.pt.
MODEL ?=
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8000
SERVE_MAX_BYTES ?=

# Containers. RUNTIME: docker | podman | local; unset, a stage runs in the image when an
# engine answers and the image is built, else locally (the choice is printed).
# GPU: empty (CPU) | nvidia | amd. The machinery behind them is in make/containers.mk.
RUNTIME ?=
GPU ?=
# One training on several processes or machines (torchrun; make/containers.mk): NPROC
# processes on this machine, NNODES machines meeting at RDZV_ENDPOINT (host:port) under
# RDZV_ID; unset, NPROC and NNODES are nproc_per_node and nnodes of params.yaml. NODE_RANK
# pins this machine's rank, MAX_RESTARTS lets torchrun restart a failed group.
NPROC ?=
NNODES ?=
NODE_RANK ?=
RDZV_ENDPOINT ?=
RDZV_ID ?=
MAX_RESTARTS ?=
SHM_SIZE ?= 2g
DOCKER ?= docker
PODMAN ?= podman
IMAGE_NAME ?= imgpipe
REGISTRY ?=
BASE_IMAGE ?=
TORCH_INDEX_URL ?=
include make/containers.mk
include make/team.mk

# No usage telemetry leaves the machine unless the user asks for it.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true

.PHONY: help setup deps-check lock data params run process-data train sweep predict serve build push mlflow-server mlflow-ui \
	mlflow-sync promote plots dashboard readme-images test bench docs lint params-check format clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(DEPS_STAMP) ## Create .venv and install the locked dependencies with uv (once per pyproject.toml + requirements.lock)

# The same install in the images (docker/*.Dockerfile) and CI. uv links from its cache: a
# second clone installs in seconds. Without uv (no index to fetch it from), pip, said once.
UV_INSTALL = { test -x $(PY) || $(UV) venv --quiet --seed --python $(PYTHON) $(VENV); } \
  && $(UV) pip install --quiet --python $(PY) -e '.[dev]' -c requirements.lock
PIP_INSTALL = { test -x $(PY) || $(PYTHON) -m venv $(VENV); } \
  && { $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --default-pip >/dev/null; } \
  && $(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' -c requirements.lock
# Python compiles a module's source again on every import when it may not write the
# bytecode beside it (PYTHONDONTWRITEBYTECODE, common in CI and container set-ups): seconds
# of CPU in every process for torch and MLflow alone. There the environment's packages are
# compiled once, here (bench/NOTES.md, "Set-up with uv"); elsewhere Python writes it on the
# first import. COMPILE_BYTECODE=1 or 0 decides instead. A file that does not compile (some
# packages ship templates or another Python's code) is left as it was, as an import would.
COMPILE_BYTECODE ?= $(if $(PYTHONDONTWRITEBYTECODE),1,0)
$(DEPS_STAMP):
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found on PATH" >&2; exit 1; }
	@echo "Installing dependencies into $(VENV) (first run only)..."
	@if [ "$(INSTALLER)" = uv ] && why="$$($(UV) --version 2>&1 >/dev/null)"; then \
	  $(UV_INSTALL); \
	else \
	  echo "$${why:-INSTALLER=$(INSTALLER)}: installing with pip instead" >&2; \
	  $(PIP_INSTALL); \
	fi
	@if [ "$(COMPILE_BYTECODE)" = 1 ]; then \
	  echo "Compiling the environment's bytecode once (PYTHONDONTWRITEBYTECODE: no import may write it)..."; \
	  $(PY) -m compileall -q -j 0 "$$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))")" >/dev/null 2>&1 || true; \
	fi
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  $(BIN)/pre-commit install >/dev/null || echo "warning: git hook not installed (pre-commit install failed)" >&2; \
	fi
	@rm -f $(VENV)/.deps-*
	@touch $@

# In DVC's copy: the environment must already match the copy's dependencies (see IN_DVC_COPY).
deps-check:
	@test -f $(DEPS_STAMP) || { echo "error: $(VENV) is not set up for this experiment's pyproject.toml and requirements.lock (an experiment never installs into it): run \`make setup\` in $(DVC_ROOT) and run the experiment again" >&2; exit 2; }

# The lock: every package of the environment pinned for Python 3.11 on every platform (one
# universal resolution; pyproject.toml's [tool.uv] requires wheels for Linux x86_64, Linux
# aarch64 and macOS arm64), resolved from pyproject.toml (dev extra included) on the primary
# index (pip's index-url, PyPI unless set), where every platform's wheels are: extra indexes
# and find-links (a local torch build, say) serve installs, not the lock. Pins already in the
# lock are kept (the same inputs give the same file); UPGRADE=1 moves every pin to the newest.
# Constraints only, with environment markers: no extras and no hashes, because hashes would
# pin one build of torch (CUDA, CPU or ROCm). pip stays the venv's own. Local version labels
# (+cpu) are dropped, and so is the marker every line would carry (Python < 3.12).
lock: ## Pin the whole environment for every platform in requirements.lock from pyproject.toml (UPGRADE=1: newest releases)
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found on PATH" >&2; exit 2; }
	@why="$$($(UV) --version 2>&1 >/dev/null)" || { echo "error: make lock needs uv: $$why" >&2; exit 2; }
	$(UV) --lock-indexes pip compile --quiet --universal --python-version 3.11 --extra dev \
	  --no-emit-package pip --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) \
	  --output-file requirements.lock pyproject.toml
	@sed -E -i -e 's/^([A-Za-z0-9._-]+==[^+;[:space:]]+)\+[A-Za-z0-9.]+/\1/' \
	  -e "s/ ; python_full_version < '3\.12'$$//" -e "s/ ; python_full_version < '3\.12' and / ; /" requirements.lock

data: $(SETUP) ## Materialise the sample digits in data/raw (kept if data/raw exists)
	@if [ -d $(RAW_DIR) ]; then \
	  echo "$(RAW_DIR) exists: kept as it is"; \
	else \
	  $(BIN)/imgpipe data sample $(RAW_DIR); \
	  if [ "$(RAW_DIR)" = data/raw ] && git rev-parse --git-dir >/dev/null 2>&1; then \
	    $(BIN)/dvc commit -q -f data.dvc; \
	    if ! git diff --quiet -- data.dvc; then \
	      git checkout -- data.dvc; \
	      echo "warning: the sample export differs from data.dvc (your data?): run \`dvc pull\`" >&2; \
	    fi; \
	  fi; \
	fi

params: $(SETUP) ## Regenerate params.yaml (and the docs' configuration reference) from conf/ (conf/ is the source of truth)
	@$(BIN)/imgpipe params write $(PARAMS)
	@if [ -d docs ]; then $(BIN)/imgpipe config reference docs/configuration.md >/dev/null; fi

run: data params ## Run the pipeline: process_data -> train -> sweep (dvc repro)
	$(BIN)/dvc repro

process-data: $(SETUP) ## Stage: raw images -> data/processed (values from params.yaml) [RUNTIME=docker|podman|local]
	@$(STAGE_CHECK)
	$(call stage,process_data.py) $(ARGS)

train: $(SETUP) ## Stage: train the CNN, tracked in MLflow + dvclive [GPU=nvidia|amd] [NPROC=N: torchrun DDP]
	@$(STAGE_CHECK)
	@$(WORLD_CHECK)
	$(call stage,train_model.py,gpu,torchrun) $(ARGS)

sweep: $(SETUP) ## Stage: Optuna sweep (conf/train_model.yaml hydra.sweeper); WORKERS=N trials at once
	@$(STAGE_CHECK)
	$(call stage,train_model.py,gpu) --multirun $(if $(WORKERS),hydra.sweeper.n_jobs=$(WORKERS)) $(ARGS)

predict: $(SETUP) ## Stage: classify predict_input (data/raw/test) -> predictions/ (MODEL= another model)
	@$(STAGE_CHECK)
	$(call stage,predict.py) $(if $(MODEL),'predict_model=$(MODEL)') $(ARGS)

# In a container the server listens on all of the container's interfaces, and the engine
# publishes the port on SERVE_HOST only (with the host's network: SERVE_HOST itself).
SERVE_ARGS = serve_port=$(SERVE_PORT) $(if $(MODEL),'serve_model=$(MODEL)') \
  $(if $(SERVE_MAX_BYTES),serve_max_bytes=$(SERVE_MAX_BYTES)) $(ARGS)
serve: $(SETUP) ## HTTP endpoint on SERVE_HOST:SERVE_PORT (127.0.0.1:8000): POST /predict; MODEL= (default: the champion, else models/model.pt)
	@$(STAGE_CHECK)
	$(if $(filter docker podman,$(STAGE_CHOICE)),$(call container_run,$(STAGE_CHOICE)) \
	  --env IMGPIPE_PARAMS_FILE=$(PARAMS) $(if $(NETWORK),,--publish $(SERVE_HOST):$(SERVE_PORT):$(SERVE_PORT)) \
	  $(IMAGE) python -u -m imgpipe serve serve_host=$(if $(NETWORK),$(SERVE_HOST),0.0.0.0),\
	  IMGPIPE_PARAMS_FILE=$(PARAMS) $(BIN)/imgpipe serve serve_host=$(SERVE_HOST)) $(SERVE_ARGS)

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

# The test modules run side by side on TEST_WORKERS processes (pytest-xdist): much of the
# suite waits on servers, subprocesses and timeouts rather than the CPU. A module stays on one
# worker (its module fixtures are built once). The modules go out in tests/conftest.py's
# order, the longest first (--no-loadscope-reorder: xdist would put the modules with the
# most tests first, and a long module of one test last, alone). TEST_WORKERS=0: one
# process. The slowest tests are listed at the end.
TEST_WORKERS ?= 2
test: data ## Run the test suite (slow end-to-end tests included; TEST_WORKERS=2 side by side)
	$(PY) -m pytest $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) --durations=25 $(PYTEST_ARGS)

bench: $(SETUP) ## Benchmark against baselines and hardware limits -> bench/RESULTS.md (BENCH_ARGS=...)
	$(PY) -u -m bench $(BENCH_ARGS)

# --strict: a broken link or a missing include fails the build. Nothing is fetched (mkdocs.yml).
docs: $(SETUP) ## The documentation site (MkDocs Material) -> site/, offline, --strict
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(SETUP) ## Every pre-commit hook on every file: ruff, yaml, hadolint, actionlint, params.yaml in sync
	$(BIN)/pre-commit run --all-files --show-diff-on-failure

params-check: $(SETUP) ## Fail when params.yaml differs from what conf/ composes
	$(BIN)/imgpipe params check $(PARAMS)

format: $(SETUP) ## Format the code with ruff
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

mlflow-server: $(SETUP) ## MLflow server on the project's store, 127.0.0.1:5000 (MLFLOW_HOST, MLFLOW_PORT); in the image when built; the team server with MLFLOW_BACKEND_STORE/MLFLOW_ARTIFACTS
ifdef TEAM_SERVER
	MLFLOW_HOST=$(MLFLOW_HOST) MLFLOW_PORT=$(MLFLOW_PORT) MLFLOW_WORKERS=$(MLFLOW_WORKERS) $(BIN)/imgpipe stack server
else
	@mkdir -p mlruns
	@$(SERVER_CHECK)
	$(SERVER_CMD) --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns/artifacts --workers $(MLFLOW_WORKERS) \
	  --host $(if $(filter local,$(SERVER_RUNTIME)),$(MLFLOW_HOST) --port $(MLFLOW_PORT),0.0.0.0 --port 5000)
endif

mlflow-ui: mlflow-server ## Alias of mlflow-server

mlflow-sync: $(SETUP) ## After a tracking outage: log what the MLflow run of models/ lacks (CHECKPOINT_DIR=models)
	$(BIN)/imgpipe sync $(or $(CHECKPOINT_DIR),models)

# VERSION is also the project's version (make/containers.mk): only one given on the command line names a model version.
PROMOTE_VERSION = $(if $(filter command line,$(origin VERSION)),$(VERSION))
promote: $(SETUP) ## Model registry: move alias champion to RUN=<run id> or VERSION=<n> (NAME= the registered model; default: params.yaml's)
	IMGPIPE_PARAMS_FILE=$(PARAMS) $(BIN)/imgpipe promote \
	  $(if $(RUN),--run '$(RUN)') $(if $(PROMOTE_VERSION),--version '$(PROMOTE_VERSION)') $(if $(NAME),--name '$(NAME)')

plots: $(SETUP) ## dvc plots show through the offline template: dvc_plots/index.html draws with no network
	$(BIN)/imgpipe plots page dvc_plots

dashboard: $(SETUP) ## Optuna dashboard over the sweep's study, 127.0.0.1:8080 (DASHBOARD_PORT); ARGS as for make sweep
	DASHBOARD_PORT=$(DASHBOARD_PORT) IMGPIPE_PARAMS_FILE=$(PARAMS) $(BIN)/imgpipe dashboard $(ARGS)

readme-images: run ## The README's pictures (curves, confusion matrix, Pareto front) from the pipeline -> docs/images
	$(BIN)/imgpipe plots readme docs/images

clean: ## Remove caches and logs (keeps data, models, mlruns and .venv)
	rm -rf logs .pytest_cache .ruff_cache outputs multirun
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
