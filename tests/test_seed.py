"""The seed's commands and values, tried as a new user would: its key names
(artifact_dir_path, data_dir_path next to processed_data_dir_path), its tracking default
(mlflow_tracking_uri: ./mlruns, a folder), its device switches (no_cuda, no_mps), and the
typed schema naming whatever it does not know, in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import error_lines
from imgpipe.compose import compose_params
from imgpipe.testing import REPO, run_script

# The seed's conf/train_model.yaml values that this project's names differ from.
SEED_VALUES = {
    "artifact_dir_path": "models",
    "mlflow_tracking_uri": "./mlruns",
    "no_cuda": False,
    "no_mps": False,
}


def test_the_seed_training_command_with_its_values_trains_and_tracks(
    sample_processed: Path, tmp_path: Path
) -> None:
    result = run_script(
        "train_model.py",
        f"data_dir_path={sample_processed}",
        "artifact_dir_path=seed_models",
        "mlflow_tracking_uri=./mlruns",
        "no_cuda=true",
        "no_mps=false",
        "epochs=1",
        "live_images=false",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "seed_models" / "model.pt").is_file()  # artifact_dir_path named it
    store = tmp_path / "mlruns" / "mlflow.db"
    said = [line for line in result.stderr.splitlines() if "is a folder" in line]
    assert len(said) == 1 and str(store) in said[0], result.stderr
    deprecated = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert deprecated == [
        "config no_cuda=true, no_mps=false is deprecated and will stop working in the next "
        "release: taken as device=cpu (set that instead)"
    ]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("image-classification")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert "test/accuracy" in runs[0].data.metrics


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(
            "processed_data_dir_path=elsewhere",
            {"data_dir_path": "elsewhere", "processed_data_dir_path": "elsewhere"},
            id="processed-sets-both",
        ),
        pytest.param(
            "artifact_dir_path=art",
            {"artifact_dir_path": "art", "model_checkpoint_dir_path": "art"},
            id="artifact-sets-both",
        ),
        pytest.param(
            "model_checkpoint_dir_path=ckpt",
            {"artifact_dir_path": "models", "model_checkpoint_dir_path": "ckpt"},
            id="the-derived-one-alone",
        ),
    ],
)
def test_one_value_sets_both_names_of_a_folder(tmp_path: Path, given: str, expected) -> None:
    """On the command line, and in params.yaml as `dvc exp run -S` writes it."""
    shown = run_script("train_model.py", given, "--cfg", "job", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert expected.items() <= yaml.safe_load(shown.stdout).items()
    params = yaml.safe_load(compose_params([given]))
    assert expected.items() <= params.items()


def _project_with_conf(tmp_path: Path, values: dict) -> Path:
    """src/ and conf/ copied, with these values in conf/train_model.yaml: the entry script
    runs the copy's package, which reads the copy's conf/."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", root / "conf")
    conf = root / "conf" / "train_model.yaml"
    lines = conf.read_text().splitlines()
    for key, value in values.items():  # the key's line replaced, or one added
        line = f"{key}: {_yaml(value)}"
        at = [i for i, x in enumerate(lines) if x.startswith(f"{key}:")]
        if at:
            lines[at[0]] = line
        else:
            lines.insert(lines.index("hydra:"), line)
    conf.write_text("\n".join(lines) + "\n")
    return root


def _yaml(value) -> str:
    return yaml.safe_dump(value).removesuffix("\n...\n").strip()


def _show(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-u", str(root / "src" / "train_model.py"), *args, "--cfg", "job"]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)


def test_the_seed_conf_values_compose(tmp_path: Path) -> None:
    root = _project_with_conf(tmp_path, SEED_VALUES)
    result = _show(root)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert (config["model_checkpoint_dir_path"], config["device"]) == ("models", "auto")
    assert config["mlflow_tracking_uri"] == "./mlruns"
    (line,) = [x for x in result.stderr.splitlines() if "deprecated" in x]
    assert "no_cuda=false, no_mps=false" in line and "device=auto (unchanged)" in line


@pytest.mark.parametrize(
    ("values", "args", "expected"),
    [
        pytest.param(
            {"artifact_dir": "models"},
            (),
            "error: conf/train_model.yaml: unknown config key 'artifact_dir'",
            id="unknown-key-in-the-file",
        ),
        pytest.param(
            {"epochs": "ten"},
            (),
            "error: conf/train_model.yaml: config key 'epochs': Value 'ten'",
            id="wrong-type-in-the-file",
        ),
        pytest.param(
            {},
            ("no_cuda=maybe",),
            "error: conf/train_model.yaml: config key 'no_cuda': Value 'maybe'",
            id="wrong-type-of-a-seed-key",
        ),
    ],
)
def test_the_schema_names_what_it_does_not_know(
    tmp_path: Path, values: dict, args: tuple[str, ...], expected: str
) -> None:
    result = _show(_project_with_conf(tmp_path, values), *args)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
