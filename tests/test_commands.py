"""The `imgpipe` command: one subcommand per job, listed by --help; usage mistakes and bad
input are one `error:` line with exit 2, as the stages' are."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import error_lines
from imgpipe.commands import COMMANDS
from imgpipe.testing import REPO, VENV


def imgpipe(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV / "bin" / "imgpipe"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_subcommand() -> None:
    result = imgpipe("--help")
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("Commands:", 1)[1].split()
    assert set(COMMANDS) <= set(listed)
    for name in COMMANDS:  # and each answers its own --help
        sub = imgpipe(name, "--help")
        assert sub.returncode == 0 and sub.stdout.startswith(f"Usage: imgpipe {name}"), sub.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        pytest.param(
            ("nope",), "error: No such command 'nope'. (see imgpipe --help)", id="command"
        ),
        pytest.param(
            ("sync",),
            "error: Missing argument 'CHECKPOINT_DIR'. (see imgpipe sync --help)",
            id="argument",
        ),
        pytest.param(
            ("plots", "page", "--what"),
            "error: No such option '--what'. (see imgpipe plots page --help)",
            id="option",
        ),
        pytest.param(
            ("config", "show", "train_model", "lr=abc"),
            "error: conf/train_model.yaml: config key 'lr': Value 'abc' of type 'str' could not "
            "be converted to Float",
            id="bad-value",
        ),
    ],
)
def test_mistakes_are_one_line_and_exit_2(args: tuple[str, ...], line: str) -> None:
    result = imgpipe(*args)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [line] and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_params_check_names_a_stale_file_and_write_fixes_it(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("lr: 1.0\n")
    stale = imgpipe("params", "check", str(params))
    assert stale.returncode == 1
    assert error_lines(stale.stderr) == [
        f"error: {params} is out of date with conf/: run `make params`"
    ]
    assert imgpipe("params", "write", str(params)).returncode == 0
    assert params.read_text() == (REPO / "params.yaml").read_text()
    assert imgpipe("params", "check", str(params)).returncode == 0


def test_python_dash_m_imgpipe_is_the_same_command() -> None:
    result = subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "imgpipe", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "Commands:" in result.stdout
