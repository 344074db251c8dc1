"""requirements.lock (`make lock`) agrees with pyproject.toml: every requirement there is
satisfied by its locked version, every package locked as a direct requirement is still in
pyproject.toml, and the lock holds nothing machine-specific. `make setup` and the images
install through it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers import error_lines
from imgpipe.testing import REPO, copy_project, make

LOCK = REPO / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
DIRECT = "imgpipe (pyproject.toml)"


def locked(text: str) -> tuple[dict[str, Version], set[str]]:
    """The pins of a lock, by canonical name, and the names pip-compile says come
    straight from pyproject.toml (``# via imgpipe (pyproject.toml)``)."""
    pins: dict[str, Version] = {}
    direct: set[str] = set()
    current = None
    for line in text.splitlines():
        if match := PIN.match(line):
            current = canonicalize_name(match.group(1))
            pins[current] = Version(match.group(2))
        elif line.startswith(" ") and DIRECT in line and current is not None:
            direct.add(current)
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"requirements.lock: not a pin: {line!r}")
    return pins, direct


def requirements(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    return [Requirement(spec) for spec in project["dependencies"]] + [
        Requirement(spec) for spec in project["optional-dependencies"]["dev"]
    ]


def disagreements(pyproject: dict, lock_text: str) -> list[str]:
    """What a user would trip over: a requirement the lock does not satisfy or lacks, and a
    locked direct requirement pyproject.toml no longer names."""
    pins, direct = locked(lock_text)
    problems = []
    wanted = requirements(pyproject)
    for req in wanted:
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in requirements.lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req}: requirements.lock has {pins[name]}")
        for extra in req.extras:  # psycopg[binary] -> psycopg-binary
            extra_name = canonicalize_name(f"{req.name}-{extra}")
            if extra_name in direct and extra_name not in pins:
                problems.append(f"{req}: the {extra} extra's package is not locked")
    names = {canonicalize_name(req.name) for req in wanted}
    problems += [
        f"requirements.lock pins {name} for pyproject.toml, which no longer asks for it"
        for name in sorted(direct - names)
        if not any(name.startswith(f"{n}-") for n in names)  # an extra's package
    ]
    return problems


def pyproject_text() -> str:
    return (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_lock_agrees_with_pyproject() -> None:
    problems = disagreements(tomllib.loads(pyproject_text()), LOCK.read_text(encoding="utf-8"))
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_a_changed_pin_or_a_new_dependency_is_caught() -> None:
    """The check above fails for the edits people make: a bumped pin, an added package,
    a removed one."""
    lock = LOCK.read_text(encoding="utf-8")
    text = pyproject_text()
    assert '"ruff==' in text and '"tqdm>=' in text
    bumped = re.sub(r'"ruff==[^"]+"', '"ruff==0.0.1"', text)
    assert any("ruff==0.0.1" in p for p in disagreements(tomllib.loads(bumped), lock))
    added = text.replace('"tqdm>=', '"not-a-locked-package>=1",\n  "tqdm>=', 1)
    assert disagreements(tomllib.loads(added), lock) == [
        "not-a-locked-package>=1 is not in requirements.lock"
    ]
    removed = re.sub(r'\n\s*"tqdm>=[^"]+",', "", text)
    assert disagreements(tomllib.loads(removed), lock) == [
        "requirements.lock pins tqdm for pyproject.toml, which no longer asks for it"
    ]


def test_lock_is_the_whole_environment_and_nothing_machine_specific() -> None:
    text = LOCK.read_text(encoding="utf-8")
    pins, _ = locked(text)
    # Transitive packages are pinned too (the point of a lock), setuptools included (torch
    # needs it at run time); pip stays the virtual environment's own.
    for name in ("sqlalchemy", "alembic", "numpy", "pandas", "flask", "setuptools"):
        assert name in pins, name
    assert "pip" not in pins
    # torch and torchvision without their local labels: any build of those versions (CPU,
    # CUDA, ROCm) satisfies the lock, and the two are pinned as a pair that works together.
    assert pins["torch"] == Version("2.14.1") and not pins["torch"].local
    assert pins["torchvision"] == Version("0.29.1") and not pins["torchvision"].local
    assert not [v for v in pins.values() if v.local]
    # Constraints files take no options, extras or hashes; no index or path of this machine.
    assert not re.search(r"^\s*-", text, re.MULTILINE)
    assert not [name for name in pins if "[" in name]
    assert "--hash" not in text and "file://" not in text and "/opt/" not in text
    assert "#    make lock" in text


def test_setup_and_images_install_through_the_lock(tmp_path: Path) -> None:
    copy = copy_project(tmp_path / "p")
    venv = tmp_path / "venv"
    result = make("setup", copy, "-n", f"VENV={venv}", "SETUP=")
    assert result.returncode == 0, result.stderr
    (install,) = [line for line in result.stdout.splitlines() if " -m pip install " in line]
    assert install.endswith("-e '.[dev]' -c requirements.lock"), install
    for variant in ("cpu", "gpu"):
        dockerfile = (REPO / "docker" / f"imgpipe-{variant}.Dockerfile").read_text()
        assert "COPY requirements.lock /tmp/requirements.lock" in dockerfile
        assert "-c /tmp/requirements.lock" in dockerfile
    assert "!requirements.lock" in (REPO / ".dockerignore").read_text().splitlines()


def test_make_lock_without_pip_tools_is_one_line(tmp_path: Path) -> None:
    copy = copy_project(tmp_path / "p")
    before = (copy / "requirements.lock").read_bytes()
    result = make("lock", copy, f"VENV={tmp_path / 'empty-venv'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [
        f"error: {tmp_path / 'empty-venv'}/bin/pip-compile not found: run make setup first"
    ]
    assert (copy / "requirements.lock").read_bytes() == before
