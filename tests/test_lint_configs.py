"""The CI workflow, Dockerfiles and hooks are checked offline with the tools `make lint` runs,
and each check is shown to catch a broken file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from imgpipe.testing import REPO, VENV

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def tool(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV / "bin" / name), *map(str, args)], capture_output=True, text=True, check=False
    )


def test_workflow_passes_actionlint_and_the_github_schema(tmp_path: Path) -> None:
    assert tool("actionlint", WORKFLOW).returncode == 0, tool("actionlint", WORKFLOW).stdout
    schema = ("--builtin-schema", "vendor.github-workflows")
    assert tool("check-jsonschema", *schema, WORKFLOW).returncode == 0

    broken = tmp_path / "ci.yml"
    broken.write_text(
        WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs_on: ubuntu-24.04", 1)
    )
    assert tool("actionlint", broken).returncode != 0
    assert tool("check-jsonschema", *schema, broken).returncode != 0


def test_workflow_covers_lint_tests_pipeline_metrics_and_image() -> None:
    import yaml

    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    steps = {name: "\n".join(str(s) for s in job["steps"]) for name, job in jobs.items()}
    assert "make lint" in steps["lint"] and "make test" in steps["test"]
    assert "make run" in steps["pipeline"] and "dvc metrics diff" in steps["pipeline"]
    assert "GITHUB_STEP_SUMMARY" in steps["pipeline"]
    assert "type=gha" in steps["image"] and "docker/imgpipe-cpu.Dockerfile" in steps["image"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path, tmp_path: Path) -> None:
    result = tool("hadolint", dockerfile)
    assert result.returncode == 0, result.stdout
    # The same check fails on the classic mistakes: an unpinned base, apt without cleanup.
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    assert tool("hadolint", bad).returncode != 0


def test_pre_commit_config_is_valid_and_fully_local() -> None:
    import yaml

    config = REPO / ".pre-commit-config.yaml"
    assert tool("pre-commit", "validate-config", config).returncode == 0
    repos = yaml.safe_load(config.read_text())["repos"]
    assert [r["repo"] for r in repos] == ["local"]  # nothing is cloned: works offline
    hooks = {h["id"]: h for h in repos[0]["hooks"]}
    for needed in (
        "ruff-check",
        "ruff-format",
        "check-yaml",
        "end-of-file-fixer",
        "check-added-large-files",
        "detect-private-key",
        "hadolint",
        "actionlint",
        "params-in-sync",
    ):
        assert needed in hooks, needed
    for hook in hooks.values():
        if hook["language"] == "python":
            assert all("==" in dep for dep in hook["additional_dependencies"]), hook["id"]
