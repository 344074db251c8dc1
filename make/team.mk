# The team setup (README "Working as a team"): a DVC remote checked before it is used,
# the team MLflow server, and a local stack of object server + PostgreSQL + MLflow.
# The logic lives in src/imgpipe/team/ behind `imgpipe stack` and `imgpipe remote`; these stay thin.
REMOTE ?=
# Any of these makes `make mlflow-server` the team server (imgpipe stack server):
# database store, proxied artifacts, basic auth. Unset: the embedded SQLite store.
TEAM_SERVER := $(strip $(MLFLOW_BACKEND_STORE)$(MLFLOW_ARTIFACTS)$(MLFLOW_AUTH_ADMIN_PASSWORD))

.PHONY: stack-up stack-down stack-env push-data pull-data

stack-up: $(SETUP) ## Start object server + PostgreSQL database + team MLflow server on 127.0.0.1; prints the env to source
	@$(BIN)/imgpipe stack up

stack-down: $(SETUP) ## Stop what stack-up started (data kept under .stack/)
	@$(BIN)/imgpipe stack down

stack-env: $(SETUP) ## Print the stack's env file again (source .stack/env)
	@$(BIN)/imgpipe stack env

push-data: $(SETUP) ## Check the DVC remote (REMOTE=name, else the default), dvc push every cached output, then check every object arrived
	@$(BIN)/imgpipe remote check $(REMOTE)
	$(BIN)/dvc push $(if $(REMOTE),--remote $(REMOTE))
	@$(BIN)/imgpipe remote verify $(REMOTE)

pull-data: $(SETUP) ## Check the DVC remote (REMOTE=name, else the default), then dvc pull
	@$(BIN)/imgpipe remote check $(REMOTE)
	$(BIN)/dvc pull $(if $(REMOTE),--remote $(REMOTE))
