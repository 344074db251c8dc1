"""`.ci/run` on a machine where a Docker engine already runs (its dry run: what it would do),
and the Docker client `make build` takes: the first with BuildKit, or one line naming the
client that lacks it. Both ask make/buildkit-client which client has BuildKit."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers import IN_CI, answering_docker, error_lines
from imgpipe.testing import REPO, make

# What Docker's own client prints when BuildKit is on and the buildx plugin is missing: the
# message users must never see from `make build`.
RAW_BUILDKIT_MESSAGE = "BuildKit is enabled but the buildx component is missing or broken."


def fake_docker(folder: Path, version: str, *, buildx: bool) -> Path:
    """A `docker` client of VERSION, with or without the buildx plugin, whose engine answers."""
    folder.mkdir(parents=True)
    client = folder / "docker"
    buildx_answer = (
        "echo 'github.com/docker/buildx v0.20.0'; exit 0"
        if buildx
        else "echo \"docker: 'buildx' is not a docker command.\" >&2; exit 1"
    )
    client.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f"  buildx) {buildx_answer} ;;\n"
        f"  version) echo '{version}'; exit 0 ;;\n"
        "  info) echo 'Server Version: 28.2.2'; exit 0 ;;\n"
        f"  build) echo 'ERROR: {RAW_BUILDKIT_MESSAGE}' >&2; exit 1 ;;\n"
        "esac\n"
        "exit 0\n"
    )
    client.chmod(0o755)
    return client


def build_command(project: Path, **env: str) -> str:
    """The `docker build` line of `make -n build`."""
    result = make("build", project, "-n", env=env)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if " build --file " in line]
    return line


@pytest.mark.parametrize(
    ("first_has_buildx", "takes"),
    [
        pytest.param(True, "docker", id="first-on-path-has-buildx"),
        pytest.param(False, "old", id="first-lacks-buildx-an-older-client-has-it-built-in"),
    ],
)
def test_build_takes_the_first_docker_on_path_with_buildkit(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    first_has_buildx: bool,
    takes: str,
) -> None:
    monkeypatch.delenv("DOCKER", raising=False)  # .ci/run exports its choice
    fake_docker(tmp_path / "new", "28.2.2", buildx=first_has_buildx)
    old = fake_docker(tmp_path / "old", "20.10.24+dfsg1", buildx=False)
    path = f"{tmp_path / 'new'}:{tmp_path / 'old'}:{os.environ['PATH']}"
    line = build_command(project, PATH=path)
    client = "docker" if takes == "docker" else str(old)
    assert line.startswith(f"DOCKER_BUILDKIT=1 {client} build --file "), line


def test_build_with_a_client_without_buildkit_is_one_line(project: Path, tmp_path: Path) -> None:
    client = fake_docker(tmp_path / "bin", "28.2.2", buildx=False)
    result = make("build", project, f"DOCKER={client}")
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert f"which {client} lacks (no buildx plugin" in line, line
    assert "DOCKER=" in line
    assert RAW_BUILDKIT_MESSAGE not in result.stdout + result.stderr


# ---- .ci/run ----------------------------------------------------------------------------


def ci_dry_run(state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`.ci/run` as a dry run, its state in STATE: it prints what it would change."""
    full_env = {**os.environ, "IMGPIPE_CI_DRY_RUN": "1", "IMGPIPE_CI_STATE": str(state), **env}
    return subprocess.run(
        ["bash", str(REPO / ".ci" / "run")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def image_exists(image: str) -> bool:
    docker = os.environ.get("DOCKER", "docker")
    return subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode == 0


def test_ci_run_uses_a_running_engine_and_makes_its_state_folder(
    docker_engine: str, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOCKER", raising=False)
    state = tmp_path / "state"  # absent: the engine was started by something else
    base = f"localhost/imgpipe-test-absent-base:{uuid.uuid4().hex[:12]}"
    for attempt in ("first", "second"):
        result = ci_dry_run(state, BASE_IMAGE=base)
        output = result.stdout + result.stderr
        assert result.returncode == 0, (attempt, output)
        assert "CI: a Docker engine answers: using it" in result.stdout, output
        assert "dockerd" not in output  # neither started nor stopped
        # The same client `make build` takes.
        (chosen,) = [line for line in result.stdout.splitlines() if "CI: docker client " in line]
        client = chosen.removeprefix("CI: docker client ").split(",")[0]
        assert build_command(project).startswith(f"DOCKER_BUILDKIT=1 {client} build "), chosen
        # The base image is missing: its build would log into the state folder.
        assert f"CI: base image {base} absent" in result.stdout, output
        log = (state / "debootstrap.log").read_text()
        assert "CI: would run: as_root debootstrap --variant=minbase" in log, log
        assert "CI: would run: make test" in result.stdout
    assert answering_docker()
    assert not image_exists(base)


def test_ci_run_keeps_a_base_image_that_exists(docker_engine: str, tmp_path: Path) -> None:
    base = os.environ.get("BASE_IMAGE", "localhost/imgpipe-base:bookworm")
    if not image_exists(base):
        if IN_CI:
            pytest.fail(f"CI must have the base image {base}: .ci/run builds it")
        pytest.skip(f"base image {base} not built (.ci/run builds it)")
    state = tmp_path / "state"
    result = ci_dry_run(state, BASE_IMAGE=base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"CI: base image {base} present" in result.stdout
    assert not (state / "debootstrap.log").exists()
    assert answering_docker()


def test_ci_run_without_an_engine_would_start_one_with_its_state(tmp_path: Path) -> None:
    socket = f"unix://{tmp_path / 'docker.sock'}"  # nothing answers there
    state = tmp_path / "state"
    result = ci_dry_run(state, DOCKER_HOST=socket)
    assert result.returncode == 0, result.stdout + result.stderr
    (start,) = [line for line in result.stdout.splitlines() if " dockerd " in line]
    assert start.startswith("CI: would run: as_root dockerd ")
    assert f"--data-root {state}/docker " in start and f"--host {socket}" in start
    assert state.is_dir()
