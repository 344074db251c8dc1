"""The model registry: sweeps move `champion` only to a better best trial, the previous one
keeps its version as `previous`, `models:/<name>@champion` predicts, `make promote` by run
and by version, training registers when named, bad input is one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import error_lines
from imgpipe.testing import copy_project, empty_store, free_port, make, run_script

pytestmark = pytest.mark.slow

NAME = "digits-cnn"


def sweep(root: Path, data: Path, store: str, lr_choices: str) -> subprocess.CompletedProcess:
    """A one-trial, one-epoch sweep that registers its best trial under NAME."""
    return run_script(
        "train_model.py",
        "--multirun",
        f"data_dir_path={data}",
        "epochs=1",
        "train_bs=64",
        f"lr=choice({lr_choices})",
        "hydra.sweeper.n_trials=1",
        f"hydra.sweep.dir={root / 'sweep' / 'results'}",
        f"mlflow_tracking_uri={store}",
        f"mlflow_registered_model_name={NAME}",
        f"log_dir={root / 'logs'}",
        cwd=root.parent,
    )


def aliases(client) -> dict[str, int]:
    return {a: int(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def version_runs(client) -> dict[int, str]:
    return {int(v.version): v.run_id for v in client.search_model_versions(f"name = '{NAME}'")}


@pytest.fixture(scope="module")
def registry(sample_processed: Path, tmp_path_factory: pytest.TempPathFactory):
    """Three sweeps into one store: a fair one, a better one, a worse one (lr far too small)."""
    from mlflow import MlflowClient

    from imgpipe.metrics import OBJECTIVE_NAMES

    root = tmp_path_factory.mktemp("registry")
    store = f"sqlite:///{empty_store(root / 'mlruns' / 'mlflow.db')}"
    client = MlflowClient(store)
    states = {}
    outputs = {}
    for label, lrs in (("fair", "0.02,0.03"), ("better", "1.0,1.1"), ("worse", "1e-5,2e-5")):
        result = sweep(root / label, sample_processed, store, lrs)
        assert result.returncode == 0, result.stderr[-3000:]
        states[label] = (aliases(client), version_runs(client))
        outputs[label] = result.stdout + result.stderr
    return {
        "root": root,
        "store": store,
        "client": client,
        "states": states,
        "outputs": outputs,
        "objective": OBJECTIVE_NAMES[0],
    }


def test_champion_moves_only_to_a_better_sweep(registry) -> None:
    client, states, outputs = registry["client"], registry["states"], registry["outputs"]
    objective = registry["objective"]

    # One version per sweep (its best trial; the trials do not register themselves).
    assert [sorted(states[k][1]) for k in ("fair", "better", "worse")] == [[1], [1, 2], [1, 2, 3]]
    runs = states["worse"][1]
    assert states["fair"][0] == {"champion": 1}
    assert states["better"][0] == {"champion": 2, "previous": 1}
    assert states["worse"][0] == {"champion": 2, "previous": 1}  # registered, not promoted

    # The rule as the runs logged it: the better sweep's model has the better first
    # objective, the worse one's is worse (compared in the objective's direction).
    value = {v: client.get_run(run).data.metrics[objective] for v, run in runs.items()}
    assert value[2] < value[1] and value[3] > value[2], value

    # Each sweep says what it did, naming the run and the version.
    assert f"registered run {runs[1]} as model '{NAME}' version 1" in outputs["fair"]
    assert (
        f"champion is version 2 (run {runs[2]}); version 1 (run {runs[1]}) is previous"
        in (outputs["better"])
    )
    assert f"version 3 (run {runs[3]}, {objective}" in outputs["worse"]
    assert "does not beat champion version 2" in outputs["worse"]


def test_the_champion_loads_through_pyfunc_and_predicts(registry, sample_processed: Path) -> None:
    """models:/<name>@champion alone classifies: its preprocessing travels with it."""
    import mlflow
    import numpy as np

    from imgpipe.data.processed import load_processed

    client = registry["client"]
    mlflow.set_tracking_uri(registry["store"])
    champion = client.get_model_version_by_alias(NAME, "champion")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")

    data = load_processed(sample_processed)
    answers = model.predict(np.asarray(data.test.images))  # uint8 pixels, as stored
    predicted = np.array([data.classes.index(c) for c in answers["prediction"]])
    accuracy = float((predicted == np.asarray(data.test.labels)).mean())
    logged = client.get_run(champion.run_id).data.metrics["test/accuracy"]
    assert accuracy == pytest.approx(logged, abs=0.5 / len(predicted))
    assert accuracy > 0.5  # ten classes: far above chance after one epoch


def test_make_promote_by_version_and_by_run(registry, tmp_path: Path) -> None:
    client, store = registry["client"], registry["store"]
    runs = version_runs(client)
    project = copy_project(tmp_path / "project")
    env = {"MLFLOW_TRACKING_URI": store}

    by_version = make("promote", project, "VERSION=3", f"NAME={NAME}", env=env)
    assert by_version.returncode == 0, by_version.stderr
    assert aliases(client) == {"champion": 3, "previous": 2}
    assert f"champion is version 3 (run {runs[3]}); version 2 (run {runs[2]}) is previous" in (
        by_version.stdout
    )

    by_run = make("promote", project, f"RUN={runs[1]}", f"NAME={NAME}", env=env)
    assert by_run.returncode == 0, by_run.stderr
    assert aliases(client) == {"champion": 1, "previous": 3}
    assert f"champion is version 1 (run {runs[1]}); version 3 (run {runs[3]}) is previous" in (
        by_run.stdout
    )
    assert sorted(version_runs(client)) == [1, 2, 3]  # by run: its existing version, no new one


def test_register_names_the_version_a_run_already_has(registry, capsys) -> None:
    from imgpipe.commands import main

    client = registry["client"]
    before, runs = aliases(client), version_runs(client)
    with pytest.raises(SystemExit) as done:  # a command's exit status, 0 here
        main(["register", "--run", runs[2], "--name", NAME, "--tracking-uri", registry["store"]])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"model '{NAME}' version 2 already holds run {runs[2]}\n"
    assert version_runs(client) == runs and aliases(client) == before


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--version", "1", "--name", "nope"], "error: no registered model 'nope'"),
        (["--version", "99"], f"error: model '{NAME}' has no version 99 (versions 1, 2, 3)"),
        (["--run", "0123456789abcdef"], "error: no MLflow run '0123456789abcdef'"),
        (["--version", "x"], "error: VERSION='x': not a version number"),
        ([], "error: promote takes one of RUN=<run id> or VERSION=<n>"),
    ],
)
def test_bad_input_is_one_line(registry, capsys, args: list[str], line: str) -> None:
    from imgpipe.commands import main

    before = aliases(registry["client"])
    with pytest.raises(SystemExit) as stopped:
        main(["promote", "--tracking-uri", registry["store"], "--name", NAME, *args])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [line] and "Traceback" not in err
    assert aliases(registry["client"]) == before


def test_an_unreachable_server_is_one_line_without_its_password(capsys) -> None:
    from imgpipe.commands import main

    url = f"http://admin:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as stopped:
        main(["promote", "--version", "1", "--name", NAME, "--tracking-uri", url])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert "127.0.0.1" in line and "unreachable" in line
    assert "s3cret" not in captured.err + captured.out


def test_a_missing_local_store_is_one_line_and_stays_missing(tmp_path: Path, capsys) -> None:
    from imgpipe.commands import main

    store = tmp_path / "typo" / "mlflow.db"
    with pytest.raises(SystemExit) as stopped:
        main(["promote", "--version", "1", "--name", NAME, "--tracking-uri", f"sqlite:///{store}"])
    assert stopped.value.code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"error: MLflow store {store} does not exist (mlflow_tracking_uri?)"
    assert not store.parent.exists()


def test_no_name_configured_is_one_line(tmp_path: Path, capsys) -> None:
    from imgpipe.commands import main

    with pytest.raises(SystemExit) as stopped:
        main(["promote", "--version", "1", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"])
    assert stopped.value.code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: no registered model name: set mlflow_registered_model_name")


def test_training_registers_its_model_when_named(sample_processed: Path, tmp_path: Path) -> None:
    """Off by default: the sweeps' trials trained without a name and registered nothing
    (one version per sweep above)."""
    from mlflow import MlflowClient

    from imgpipe.testing import train_config
    from imgpipe.train import train

    store = tmp_path / "mlflow.db"
    cfg = train_config(
        sample_processed, tmp_path, store=store, epochs=1, mlflow_registered_model_name=NAME
    )
    result = train(cfg)
    client = MlflowClient(f"sqlite:///{store}")
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert (int(version.version), version.run_id) == (1, result.run_id)
    assert client.get_registered_model(NAME).aliases == {}  # training moves no alias


@pytest.mark.parametrize("name", ["", "  ", "it's"])
def test_a_bad_name_stops_before_training(name: str) -> None:
    from imgpipe.config import TrainConfig
    from imgpipe.errors import PipelineError

    with pytest.raises(PipelineError, match="config key 'mlflow_registered_model_name'"):
        TrainConfig(mlflow_registered_model_name=name)
