"""Config: params.yaml generated from conf/, typed validation, params layering under DVC."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import error_lines
from imgpipe.compose import compose_params
from imgpipe.config import TrainConfig
from imgpipe.errors import PipelineError
from imgpipe.testing import REPO, run_script


def test_committed_params_yaml_matches_conf() -> None:
    assert (REPO / "params.yaml").read_text() == compose_params(), "run `make params`"


def test_params_yaml_is_what_dvc_exp_run_writes(tmp_path: Path) -> None:
    """DVC composes conf/ itself on `dvc exp run`; both writers must agree byte for byte."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "pipeline", str(REPO), ["lr=1.4"])
    assert out.read_text() == compose_params(["lr=1.4"])
    assert yaml.safe_load(out.read_text())["lr"] == 1.4


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"gamma": 1.5}, "gamma"),
        ({"train_bs": 0}, "train_bs"),
    ],
)
def test_train_config_rejects_bad_values(kwargs: dict, key: str) -> None:
    with pytest.raises(PipelineError, match=f"'{key}'"):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        pytest.param("lrr=1", "unknown config key 'lrr'", id="unknown-key"),
        pytest.param("lr=abc", "config key 'lr'", id="wrong-type"),
        pytest.param("epochs=-1", "config key 'epochs'", id="negative-epochs"),
        pytest.param("setup_mlflow=maybe", "config key 'setup_mlflow'", id="not-a-bool"),
    ],
)
def test_bad_overrides_stop_before_any_work(tmp_path: Path, override: str, expected: str) -> None:
    result = run_script("train_model.py", override, f"log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no logs, no mlruns, nothing


def _composed(result) -> dict:
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_params_file_layers_between_conf_and_command_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    values = yaml.safe_load(compose_params()) | {
        "lr": 1.3,
        "epochs": 4,
        "mlflow_run_name": "it's mine",
    }
    params.write_text(yaml.safe_dump(values))
    env = {"IMGPIPE_PARAMS_FILE": str(params)}
    from_file = _composed(run_script("train_model.py", "--cfg", "job", cwd=tmp_path, env=env))
    assert (from_file["lr"], from_file["epochs"], from_file["mlflow_run_name"]) == (
        1.3,
        4,
        "it's mine",
    )
    cli_wins = _composed(
        run_script("train_model.py", "lr=1.5", "--cfg", "job", cwd=tmp_path, env=env)
    )
    assert (cli_wins["lr"], cli_wins["epochs"]) == (1.5, 4)
    no_file = _composed(run_script("train_model.py", "--cfg", "job", cwd=tmp_path))
    assert no_file["lr"] == 1.0


def test_bad_params_file_names_the_file(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("lr: [unclosed\n")
    result = run_script("train_model.py", cwd=tmp_path, env={"IMGPIPE_PARAMS_FILE": str(params)})
    assert result.returncode == 2
    assert str(params) in error_lines(result.stderr)[0]


def test_the_configuration_reference_is_generated_from_the_schema() -> None:
    """docs/configuration.md cannot drift: regenerate it with `imgpipe config reference`."""
    from imgpipe.config import SCHEMAS
    from imgpipe.reference import configuration_reference

    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == configuration_reference(), "run `imgpipe config reference`"
    for schema in SCHEMAS.values():  # every key a stage accepts is on the page
        for name in schema.__dataclass_fields__:
            assert f"| `{name}` |" in page


def test_a_conf_file_that_is_not_yaml_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import shutil

    import imgpipe.compose

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "train_model.yaml").write_text(
        (conf / "train_model.yaml").read_text() + "lr: 2.0\n"  # lr twice
    )
    monkeypatch.setattr(imgpipe.compose, "conf_dir", lambda: conf)
    with pytest.raises(PipelineError, match=r"^conf/train_model.yaml line \d+: invalid YAML"):
        imgpipe.compose.load_stage_config("train_model")
