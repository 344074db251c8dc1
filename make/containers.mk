# The container machinery behind the Makefile's targets (included by it): the image's tag,
# the runtime choice, the checks that stop with one line, GPU flags, and the commands that
# run a stage or the tracking server in a container. The settings users give
# (RUNTIME, GPU, DOCKER, PODMAN, IMAGE_NAME, ...) are at the top of the Makefile.

# The image: the variant GPU= picks, its tag, Dockerfile and labels (version, git revision).
VERSION = $(eval VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml))$(VERSION)
ifneq ($(filter-out docker podman local,$(RUNTIME)),)
$(error RUNTIME=$(RUNTIME) is not one of docker, podman, local)
endif
ifneq ($(filter-out nvidia amd,$(GPU)),)
$(error GPU=$(GPU) is not one of nvidia, amd (leave it empty for the CPU))
endif
VARIANT := $(if $(GPU),$(if $(filter amd,$(GPU)),rocm,cuda),cpu)
IMAGE ?= $(IMAGE_NAME):$(VARIANT)
DOCKERFILE := docker/$(IMAGE_NAME)-$(if $(GPU),gpu,cpu).Dockerfile
GIT_SHA = $(eval GIT_SHA := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown))$(GIT_SHA)

# Evaluated once, and only by the targets that start containers (not by `make params`).
CALLER = $(eval CALLER := $(shell echo "$$(id -u):$$(id -g)"))$(CALLER)
CALLER_NAME = $(eval CALLER_NAME := $(shell id -un))$(CALLER_NAME)
MLFLOW_IMAGE ?= $(IMAGE)
# Names passed into containers; their values never appear on a command line or in a log.
CONTAINER_ENV ?= MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD \
  MLFLOW_TRACKING_TOKEN MLFLOW_TRACKING_INSECURE_TLS MLFLOW_HPTUNING_TAG MLFLOW_EXPERIMENT_NAME \
  MLFLOW_S3_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN \
  AWS_DEFAULT_REGION DVC_ROOT DVC_EXP_NAME MLFLOW_DISABLE_TELEMETRY DO_NOT_TRACK
# NETWORK: the container network; unset, the host's when a tracking or study URL points at
# the host itself (127.0.0.1 in a container is the container), else the engine's default.
# (grep reads all its input: with -q and pipefail the writer's SIGPIPE would fail the test.)
NETWORK ?= $(eval NETWORK := $(shell $(loopback_urls) && echo host))$(NETWORK)
loopback_urls = { printf '%s\n' "$${MLFLOW_TRACKING_URI:-}"; cat $(PARAMS) conf/train_model.yaml 2>/dev/null; } \
  | grep -E '://([^/@[:space:]]*@)?(localhost|127\.[0-9.]+|\[::1\])([:/]|$$)' >/dev/null

# The runtime, picked once per make: RUNTIME when given, else docker (then podman) when the
# engine answers and has the image, else local; with the reason when picked.
detect_runtime = $(shell \
  if [ "$$(id -u)" = 0 ]; then echo "local (running as root: containers run stages as a non-root caller only)"; \
  elif $(DOCKER) image inspect $(1) >/dev/null 2>&1; then echo docker; \
  elif $(PODMAN) image inspect $(1) >/dev/null 2>&1; then echo podman; \
  elif $(DOCKER) info >/dev/null 2>&1 || $(PODMAN) info >/dev/null 2>&1; then echo "local (image $(1) not built: make build)"; \
  else echo "local (no container engine answers)"; fi)
STAGE_CHOICE = $(eval STAGE_CHOICE := $(or $(RUNTIME),$(call detect_runtime,$(IMAGE))))$(STAGE_CHOICE)
SERVER_CHOICE = $(eval SERVER_CHOICE := $(or $(RUNTIME),$(call detect_runtime,$(MLFLOW_IMAGE))))$(SERVER_CHOICE)
engine_bin = $(if $(filter podman,$(1)),$(PODMAN),$(DOCKER))
# build and push: the engine RUNTIME names, else docker when installed, else podman
ENGINE = $(eval ENGINE := $(if $(filter docker podman,$(RUNTIME)),$(RUNTIME),$(shell \
  command -v $(DOCKER) >/dev/null 2>&1 || ! command -v $(PODMAN) >/dev/null 2>&1 && echo docker || echo podman)))$(ENGINE)
ENGINE_BIN = $(call engine_bin,$(ENGINE))
BUILD_ENV = $(if $(filter docker,$(ENGINE)),DOCKER_BUILDKIT=1)
# build on docker: a client with BuildKit (make/buildkit-client says which has it): DOCKER
# when given, else the first docker on PATH that has it, else /usr/bin/docker; empty if none.
DOCKER_GIVEN = $(if $(filter file,$(origin DOCKER)),,$(DOCKER))
BUILDKIT_CLIENT = $(eval BUILDKIT_CLIENT := $(shell sh make/buildkit-client $(DOCKER_GIVEN)))$(BUILDKIT_CLIENT)
BUILD_BIN = $(if $(filter docker,$(ENGINE)),$(or $(BUILDKIT_CLIENT),$(DOCKER)),$(ENGINE_BIN))

# One line and exit 2 before anything runs: no engine, caller is root, image missing, no BuildKit.
check_engine = $(call engine_bin,$(1)) info >/dev/null 2>&1 || { \
  echo "error: no $(1) engine answers ($(call engine_bin,$(1)) info failed): start it or use RUNTIME=local" >&2; exit 2; }
check_image = $(call engine_bin,$(1)) image inspect $(2) >/dev/null 2>&1 || { \
  echo "error: image $(2) not found in $(1): run \`make build$(if $(GPU), GPU=$(GPU))\` first" >&2; exit 2; }
check_caller = [ "$$(id -u)" != 0 ] || { \
  echo "error: RUNTIME=$(1) as root would run the stage as root in the container: run make as a user in the $(1) group or use RUNTIME=local" >&2; exit 2; }
container_checks = echo "runtime: $(1)$(if $(filter docker podman,$(1)), ($(2)))"$(if $(filter docker podman,$(1)),; \
  $(call check_engine,$(1)); $(call check_caller,$(1)); $(call check_image,$(1),$(2)))
STAGE_CHECK = $(call container_checks,$(STAGE_CHOICE),$(IMAGE))
ENGINE_CHECK = $(call check_engine,$(ENGINE))
BUILDKIT_CHECK = $(if $(filter docker,$(ENGINE)),test -n "$(BUILDKIT_CLIENT)" || { \
  echo "error: the Dockerfiles need BuildKit$(buildkit_lacking): install the buildx plugin or choose another client with DOCKER=/path/to/docker" >&2; exit 2; })
buildkit_lacking = , which $(or $(DOCKER_GIVEN),$$(command -v $(DOCKER)) and every other docker on PATH) \
  lack$(if $(DOCKER_GIVEN),s) (no buildx plugin; only clients before version 23 have it built in)
IMAGE_CHECK = $(call check_image,$(ENGINE),$(IMAGE))

# GPU flags per engine; `device=cuda` tells the code (ROCm builds of torch use the cuda API too).
GPU_FLAGS_docker_nvidia := --gpus=all
GPU_FLAGS_podman_nvidia := --device=nvidia.com/gpu=all
GPU_FLAGS_docker_amd := --device=/dev/kfd --device=/dev/dri --group-add video
GPU_FLAGS_podman_amd := $(GPU_FLAGS_docker_amd)
DEVICE_ARG := $(if $(GPU),device=cuda)
# Rootless podman maps the caller's uid into the container only with keep-id.
USERNS = $(if $(filter podman,$(1)),$(shell $(PODMAN) info --format '{{.Host.Security.Rootless}}' 2>/dev/null | grep true >/dev/null && echo --userns=keep-id))
# The workspace is mounted at its own path, so every path (checkpoints, the MLflow store and
# the artifact locations it records) is the same inside and outside; under `dvc exp run
# --temp` the whole repository is, so the store in $$DVC_ROOT/mlruns stays reachable.
MOUNT = $(or $(DVC_ROOT),$(CURDIR))
# $(call container,ENGINE): `run` as the caller, for stages and the tracking server alike.
# getpass (DVC, MLflow) needs a user name, which the image's passwd lacks for the caller's uid.
container = $(call engine_bin,$(1)) run --rm --init --user $(CALLER) $(call USERNS,$(1)) \
  --env HOME=/tmp --env USER=$(CALLER_NAME) --env LOGNAME=$(CALLER_NAME)
container_run = $(call container,$(1)) \
  --volume $(MOUNT):$(MOUNT) --workdir $(CURDIR) --env PYTHONPATH=$(CURDIR)/src \
  $(foreach var,$(CONTAINER_ENV),--env $(var)) $(if $(NETWORK),--network $(NETWORK))
# $(call stage,SCRIPT[,gpu][,torchrun]): an entry point with its values from params.yaml, in the
# image or in $(VENV); with torchrun, started on every process of the world (below) when it has several.
stage = $(strip $(if $(filter docker podman,$(STAGE_CHOICE)),$(call container_run,$(STAGE_CHOICE)) \
  --env IMGPIPE_PARAMS_FILE=$(PARAMS) $(if $(2),$(GPU_FLAGS_$(STAGE_CHOICE)_$(GPU))) $(if $(3),$(WORLD_FLAGS)) $(IMAGE) python,\
  IMGPIPE_PARAMS_FILE=$(PARAMS) $(PY)) -u $(if $(3),$(LAUNCH))src/$(1)$(if $(2),$(if $(DEVICE_ARG), $(DEVICE_ARG)))$(if $(3),$(WORLD_ARGS)))

# The world of one training: NPROC processes on each of NNODES machines, by default the
# nproc_per_node and nnodes of params.yaml (so `dvc exp run -S nproc_per_node=2` trains on 2).
# More than one process: torchrun starts them, through imgpipe.distributed's launcher (the same
# arguments; the group's outcome as one line); one: the plain python command.
param = $(shell sed -n 's/^$(1): *\([^ #]*\).*/\1/p' $(PARAMS) 2>/dev/null)
WORLD_NPROC = $(eval WORLD_NPROC := $(or $(NPROC),$(call param,nproc_per_node),1))$(WORLD_NPROC)
WORLD_NNODES = $(eval WORLD_NNODES := $(or $(NNODES),$(call param,nnodes),1))$(WORLD_NNODES)
SEVERAL_NODES = $(filter-out 1,$(WORLD_NNODES))
SEVERAL = $(filter-out 1,$(WORLD_NPROC) $(WORLD_NNODES))
# One node: --standalone (a rendezvous on a free local port). Several: every node runs the
# same command, meeting through c10d at RDZV_ENDPOINT under one RDZV_ID.
TORCHRUN_ARGS = $(if $(SEVERAL_NODES),--nnodes=$(WORLD_NNODES)$(if $(NODE_RANK), --node-rank=$(NODE_RANK)) \
  --rdzv-backend=c10d --rdzv-endpoint=$(RDZV_ENDPOINT) --rdzv-id=$(or $(RDZV_ID),$(IMAGE_NAME)-train),--standalone) \
  --nproc-per-node=$(WORLD_NPROC)$(if $(MAX_RESTARTS), --max-restarts=$(MAX_RESTARTS))
LAUNCH = $(if $(SEVERAL),-m imgpipe.distributed $(TORCHRUN_ARGS) )
# Given on make's command line, the world is also what the run's config records.
WORLD_ARGS = $(if $(NPROC)$(NNODES), nproc_per_node=$(WORLD_NPROC) nnodes=$(WORLD_NNODES))
# In a container: nccl passes tensors through shared memory between the processes of a node,
# more than the engine's default 64 MB /dev/shm holds: the host's IPC namespace on GPUs,
# a bigger /dev/shm otherwise; several nodes meet on the host's network.
WORLD_FLAGS = $(if $(SEVERAL),$(if $(GPU),--ipc=host,--shm-size=$(SHM_SIZE))$(if $(and $(SEVERAL_NODES),$(if $(NETWORK),,host)), --network host))

# One line and exit 2 before anything starts: a count that is no whole number, nodes without
# a meeting point.
whole = [ "$(1)" -ge $(2) ] 2>/dev/null || { echo "error: $(3)=$(1) is not a whole number >= $(2)" >&2; exit 2; }
WORLD_CHECK = $(call whole,$(WORLD_NPROC),1,$(if $(NPROC),NPROC,$(PARAMS): nproc_per_node)); \
  $(call whole,$(WORLD_NNODES),1,$(if $(NNODES),NNODES,$(PARAMS): nnodes))$(if $(NODE_RANK),; \
  $(call whole,$(NODE_RANK),0,NODE_RANK))$(if $(MAX_RESTARTS),; $(call whole,$(MAX_RESTARTS),0,MAX_RESTARTS))$(if $(SEVERAL_NODES),; \
  test -n "$(RDZV_ENDPOINT)" || { echo "error: NNODES=$(WORLD_NNODES) needs RDZV_ENDPOINT=host:port (a machine every node reaches; the same on all)" >&2; exit 2; })

# The tracking server: in the image (it holds the same MLflow as the code) or from $(VENV).
SERVER_RUNTIME = $(firstword $(SERVER_CHOICE))
SERVER_CHECK = $(call container_checks,$(SERVER_CHOICE),$(MLFLOW_IMAGE))
SERVER_CMD = $(if $(filter docker podman,$(SERVER_RUNTIME)),$(call container,$(SERVER_RUNTIME)) \
  --volume $(CURDIR)/mlruns:$(CURDIR)/mlruns \
  --env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false --publish $(MLFLOW_HOST):$(MLFLOW_PORT):5000 \
  --name $(IMAGE_NAME)-mlflow-$(MLFLOW_PORT) $(MLFLOW_IMAGE) mlflow server,\
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} $(BIN)/mlflow server)

# The wheels of the lock's versions that pip's configuration finds on this machine's disk
# (find-links folders, file:// indexes) are linked into the CPU image's build context
# (docker/wheels/cpu), so the build installs torch from them instead of downloading it.
link_wheels = $(if $(GPU),:,$(PYTHON) make/uv.py --link-wheels docker/wheels/cpu requirements.lock)
