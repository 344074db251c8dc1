"""requirements.lock (`make lock`, uv's universal resolution) agrees with pyproject.toml on
every platform the project supports: every requirement there is satisfied by its locked
version, every package locked as a direct requirement is still in pyproject.toml, each of
Linux x86_64, Linux aarch64 and macOS arm64 gets exactly one version of each package, and the
lock holds nothing machine-specific. `make setup` installs through it with uv (pip when uv
cannot be had, said in one line); the images and CI run the same install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers import error_lines
from imgpipe.testing import REPO, copy_project, make

LOCK = REPO / "requirements.lock"
DIRECT = "imgpipe (pyproject.toml)"
# The platforms of the universal lock, as their interpreters describe themselves.
PLATFORMS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "macos-arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
}  # fmt: skip


def environment(platform: str, python: str = "3.11.9") -> dict[str, str]:
    env = default_environment()
    env.update(PLATFORMS[platform])
    env.update(python_version="3.11", python_full_version=python, implementation_name="cpython")
    env.update(platform_python_implementation="CPython", os_name="posix")
    return env


def locked(text: str) -> tuple[list[Requirement], set[str]]:
    """The lock's pins (with their markers) and the names it says come straight from
    pyproject.toml (``# via imgpipe (pyproject.toml)``)."""
    pins: list[Requirement] = []
    direct: set[str] = set()
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            if DIRECT in line and pins:
                direct.add(canonicalize_name(pins[-1].name))
            continue
        if line.startswith((" ", "-")):
            raise AssertionError(f"requirements.lock: not a pin: {line!r}")
        req = Requirement(line)
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
        pins.append(req)
    return pins, direct


def pinned(req: Requirement) -> Version:
    return Version(next(iter(req.specifier)).version)


def on(platform: str, pins: list[Requirement], python: str = "3.11.9") -> dict[str, Version]:
    """The versions a platform installs: one per package, or an AssertionError."""
    env = environment(platform, python)
    chosen: dict[str, Version] = {}
    for req in pins:
        if req.marker is None or req.marker.evaluate(env):
            name = canonicalize_name(req.name)
            assert name not in chosen, f"{name} locked twice for {platform}"
            chosen[name] = pinned(req)
    return chosen


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
    for platform in PLATFORMS:
        versions = on(platform, pins)
        for req in wanted:
            name = canonicalize_name(req.name)
            if name not in versions:
                problems.append(f"{req} is not in requirements.lock ({platform})")
            elif not req.specifier.contains(versions[name], prereleases=True):
                problems.append(f"{req}: requirements.lock has {versions[name]} ({platform})")
            for extra in req.extras:  # psycopg[binary] -> psycopg-binary
                extra_name = canonicalize_name(f"{req.name}-{extra}")
                if extra_name in direct and extra_name not in versions:
                    problems.append(f"{req}: the {extra} extra's package is not locked")
    names = {canonicalize_name(req.name) for req in wanted}
    problems += [
        f"requirements.lock pins {name} for pyproject.toml, which no longer asks for it"
        for name in sorted(direct - names)
        if not any(name.startswith(f"{n}-") for n in names)  # an extra's package
    ]
    return list(dict.fromkeys(problems))  # one line per problem, not one per platform


def pyproject_text() -> str:
    return (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_lock_agrees_with_pyproject_on_every_platform() -> None:
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
        f"not-a-locked-package>=1 is not in requirements.lock ({platform})"
        for platform in PLATFORMS
    ]
    removed = re.sub(r'\n\s*"tqdm>=[^"]+",', "", text)
    assert disagreements(tomllib.loads(removed), lock) == [
        "requirements.lock pins tqdm for pyproject.toml, which no longer asks for it"
    ]


def test_one_lock_serves_linux_and_macos_with_the_same_torch() -> None:
    pins, _ = locked(LOCK.read_text(encoding="utf-8"))
    linux, arm, mac = (on(p, pins) for p in PLATFORMS)
    # torch and torchvision without their local labels: any build of those versions (CPU,
    # CUDA, ROCm) satisfies the lock, and the two are pinned as a pair that works together.
    for versions in (linux, arm, mac):
        assert versions["torch"] == Version("2.14.1") and not versions["torch"].local
        assert versions["torchvision"] == Version("0.29.1") and not versions["torchvision"].local
        assert versions["timm"] == linux["timm"]
    # The CUDA libraries PyPI's Linux torch needs are Linux's alone; the rest is shared.
    assert "nvidia-cudnn-cu13" in linux and "nvidia-cudnn-cu13" in arm
    cuda = ("nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cublas", "cuda-toolkit", "triton")
    assert not [name for name in cuda if name in mac]
    assert set(mac) - set(linux) == set()
    # Python 3.11 throughout: the lock holds no line for another Python.
    assert on("linux-x86_64", pins, "3.11.0")["torch"] == Version("2.14.1")


def test_lock_is_the_whole_environment_and_nothing_machine_specific() -> None:
    text = LOCK.read_text(encoding="utf-8")
    pins, _ = locked(text)
    names = {canonicalize_name(req.name) for req in pins}
    # Transitive packages are pinned too (the point of a lock), setuptools included (torch
    # needs it at run time); pip stays the virtual environment's own.
    for name in ("sqlalchemy", "alembic", "numpy", "pandas", "flask", "setuptools"):
        assert name in names, name
    assert "pip" not in names
    assert not [req for req in pins if pinned(req).local]
    # Constraints files take no options, extras or hashes; no index or path of this machine.
    assert not re.search(r"^\s*-", text, re.MULTILINE)
    assert not [req for req in pins if req.extras]
    assert "--hash" not in text and "file://" not in text and "/opt/" not in text
    assert "#    make lock" in text


def test_setup_installs_through_the_lock_with_uv_and_images_and_ci_do_the_same(
    tmp_path: Path,
) -> None:
    copy = copy_project(tmp_path / "p")
    result = make("setup", copy, "-n", f"VENV={tmp_path / 'venv'}", "SETUP=")
    assert result.returncode == 0, result.stderr
    assert "make/uv.py pip install --quiet --python" in result.stdout
    assert "-e '.[dev]' -c requirements.lock" in result.stdout
    for variant in ("cpu", "gpu"):
        dockerfile = (REPO / "docker" / f"imgpipe-{variant}.Dockerfile").read_text()
        assert "COPY requirements.lock /tmp/requirements.lock" in dockerfile
        assert "/tmp/uv.py pip install" in dockerfile and "-c /tmp/requirements.lock" in dockerfile
        assert "--mount=type=cache,target=/root/.cache/uv" in dockerfile
        assert "UV_COMPILE_BYTECODE=1" in dockerfile
    assert "!requirements.lock" in (REPO / ".dockerignore").read_text().splitlines()
    workflow = (REPO / ".github" / "workflows" / "ci.yml").read_text()
    assert "make setup" in workflow and "cache: pip" not in workflow


def tiny_project(tmp_path: Path) -> Path:
    """The project's Makefile and make/uv.py over a package with no dependencies: the real
    set-up machinery, installing in seconds."""
    copy = copy_project(tmp_path / "p")
    text = (copy / "pyproject.toml").read_text()
    text = re.sub(r"(?ms)^dependencies = \[.*?^\]", "dependencies = []", text)
    text = re.sub(r"(?ms)^dev = \[.*?^\]", "dev = []", text)
    (copy / "pyproject.toml").write_text(text)
    (copy / "requirements.lock").write_text("")
    return copy


def unreachable_index(tmp_path: Path) -> dict[str, str]:
    """pip's configuration pointing at an index that does not answer, and an empty tools
    folder: uv cannot be installed."""
    return {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "IMGPIPE_TOOLS_DIR": str(tmp_path / "tools"),
    }


def test_setup_with_uv_installs_the_project_into_a_new_venv(tmp_path: Path) -> None:
    copy = tiny_project(tmp_path)
    venv = tmp_path / "venv"
    result = make("setup", copy, f"VENV={venv}", "SETUP=", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "installing with pip" not in result.stderr
    assert len(list(venv.glob(".deps-*"))) == 1
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import imgpipe; print(imgpipe.__file__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert where == str(copy / "src" / "imgpipe" / "__init__.py")  # editable: the clone's code
    # A second `make setup` with the same files installs nothing.
    again = make("setup", copy, f"VENV={venv}")
    assert again.returncode == 0 and "Installing" not in again.stdout, again.stdout


@pytest.mark.parametrize("forbidden", [True, False], ids=["no-bytecode-writes", "default"])
def test_setup_compiles_bytecode_once_where_no_import_may_write_it(
    tmp_path: Path, forbidden: bool
) -> None:
    """With PYTHONDONTWRITEBYTECODE set, every import would compile its module's source
    again: `make setup` leaves the venv's bytecode in place, and imports read it. Where
    Python may write it on the first import, set-up leaves that to Python."""
    copy = tiny_project(tmp_path)
    venv = tmp_path / "venv"
    env = {"PYTHONDONTWRITEBYTECODE": "1" if forbidden else ""}
    result = make("setup", copy, f"VENV={venv}", "SETUP=", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ("Compiling the environment's bytecode once" in result.stdout) == forbidden
    find = "import importlib.util; print(importlib.util.find_spec('pip').cached)"  # no import
    cached = subprocess.run(
        [venv / "bin" / "python", "-c", find],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    ).stdout.strip()  # fmt: skip
    assert Path(cached).is_file() == forbidden, cached


def test_a_package_file_that_does_not_compile_leaves_setup_and_the_rest_whole(
    tmp_path: Path,
) -> None:
    """compileall fails for a file of invalid syntax (packages ship such templates): set-up
    still ends well, and every other module has its bytecode."""
    copy = tiny_project(tmp_path)
    venv = tmp_path / "venv"
    off = make("setup", copy, f"VENV={venv}", "SETUP=", "COMPILE_BYTECODE=0", timeout=300)
    assert off.returncode == 0, off.stderr
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(
        subprocess.check_output([venv / "bin" / "python", "-c", where], text=True).strip()
    )
    (purelib / "broken_template.py").write_text("def {{ name }}(:\n")
    for stamp in venv.glob(".deps-*"):
        stamp.unlink()  # set up again: the same install, now compiled
    result = make("setup", copy, f"VENV={venv}", "SETUP=", "COMPILE_BYTECODE=1", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Compiling the environment's bytecode once" in result.stdout
    assert list((purelib / "pip" / "__pycache__").glob("__init__.cpython-*.pyc"))
    assert not list(purelib.glob("__pycache__/broken_template.*.pyc"))


def test_setup_without_uv_falls_back_to_pip_with_one_line(tmp_path: Path) -> None:
    copy = tiny_project(tmp_path)
    venv = tmp_path / "venv"
    result = make("setup", copy, f"VENV={venv}", "SETUP=", "UV_VERSION=0.0.0", timeout=300)
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if "installing with pip" in ln]
    assert line.startswith("uv 0.0.0 unavailable (") and "uv==0.0.0" in line, line
    assert (venv / "bin" / "pip").exists() and len(list(venv.glob(".deps-*"))) == 1


def test_pip_configuration_reaches_uv_without_secrets(tmp_path: Path) -> None:
    """uv reads neither pip.conf nor PIP_*: make/uv.py hands both over, hiding passwords,
    and leaves alone what the user set for uv."""
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://user:s3cret@mirror.invalid/simple\n"
        "extra-index-url = file:///srv/a/simple file:///srv/b/simple\n"
    )
    env = {**os.environ, "PIP_CONFIG_FILE": str(conf), "PIP_FIND_LINKS": "/srv/wheels /srv/more"}
    env.pop("UV_INDEX_STRATEGY", None)
    env.pop("UV_HTTP_TIMEOUT", None)
    out = subprocess.run(
        [sys.executable, str(REPO / "make" / "uv.py"), "--settings"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert "UV_INDEX_URL=https://user:***@mirror.invalid/simple" in out
    assert "UV_EXTRA_INDEX_URL=file:///srv/a/simple file:///srv/b/simple" in out
    assert "UV_FIND_LINKS=/srv/wheels,/srv/more" in out
    assert "UV_INDEX_STRATEGY=unsafe-best-match" in out
    assert "s3cret" not in "\n".join(out)
    mine = subprocess.run(
        [sys.executable, str(REPO / "make" / "uv.py"), "--settings"],
        env={**env, "UV_INDEX_URL": "https://mine.invalid/simple"},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "UV_INDEX_URL" not in mine


def test_make_lock_without_uv_is_one_line(tmp_path: Path) -> None:
    copy = copy_project(tmp_path / "p")
    before = (copy / "requirements.lock").read_bytes()
    result = make("lock", copy, env=unreachable_index(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: make lock needs uv: uv 0.13.9 unavailable ("), line
    assert (copy / "requirements.lock").read_bytes() == before
