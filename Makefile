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
WORKERS ?=
BENCH_ARGS ?=
MLFLOW_PORT ?= 5000
MLFLOW_HOST ?= 127.0.0.1

# No usage telemetry leaves the machine unless the user asks for it.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true

.PHONY: help setup data params run process-data train sweep test bench lint format mlflow-ui clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(DEPS_STAMP) ## Create .venv and install the pinned dependencies (once per pyproject.toml)

$(DEPS_STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found on PATH" >&2; exit 1; }
	@echo "Installing dependencies into $(VENV) (first run only)..."
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
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

process-data: $(SETUP) ## Stage: raw images -> data/processed (values from params.yaml)
	IMGPIPE_PARAMS_FILE=$(PARAMS) $(PY) -u src/process_data.py $(ARGS)

train: $(SETUP) ## Stage: train the CNN, tracked in MLflow + dvclive (values from params.yaml)
	IMGPIPE_PARAMS_FILE=$(PARAMS) $(PY) -u src/train_model.py $(ARGS)

sweep: $(SETUP) ## Stage: Optuna sweep (conf/train_model.yaml hydra.sweeper); WORKERS=N trials at once
	IMGPIPE_PARAMS_FILE=$(PARAMS) $(PY) -u src/train_model.py --multirun \
	  $(if $(WORKERS),hydra.sweeper.n_jobs=$(WORKERS)) $(ARGS)

test: data ## Run the test suite (slow end-to-end tests included)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(SETUP) ## Benchmark against baselines and hardware limits -> bench/RESULTS.md (BENCH_ARGS=...)
	$(PY) -u bench/run.py $(BENCH_ARGS)

lint: $(SETUP) ## ruff check + format check, params.yaml in sync with conf/
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(PY) -m imgpipe.config --check $(PARAMS)

format: $(SETUP) ## Format the code with ruff
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

mlflow-ui: $(SETUP) ## Serve the local MLflow store on http://127.0.0.1:5000
	@mkdir -p mlruns
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns/artifacts \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1

clean: ## Remove caches and logs (keeps data, models, mlruns and .venv)
	rm -rf logs .pytest_cache .ruff_cache outputs multirun
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
