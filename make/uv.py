"""The project's pinned uv, run with pip's own configuration: `make setup`, `make lock`, the
images and CI install through here.

    python3 make/uv.py ARGS...     run uv ARGS (installed on first use, see below)
    python3 make/uv.py --lock-indexes ARGS...
                                   the same with pip's primary index only (make lock: extra
                                   indexes and find-links may hold one platform's builds)
    python3 make/uv.py --settings  the uv settings taken from pip's configuration (no secrets)
    python3 make/uv.py --link-wheels DEST LOCK
                                   link into DEST the wheels of LOCK's versions that pip's
                                   configuration finds on this machine's disk (find-links
                                   folders, file:// indexes), for an image build (make build)

uv is installed once per user and version, with pip, into
${IMGPIPE_TOOLS_DIR:-${XDG_CACHE_HOME:-~/.cache}/imgpipe}/uv-<version> (no root needed; a
second clone finds it there). uv reads neither pip.conf nor PIP_* variables, so the package
locations users gave pip (`pip config list` shows them: index-url, extra-index-url,
find-links, cert, trusted-host, timeout; from files or the environment) are handed to uv as
its own variables; a UV_* variable the user set wins. No path of any machine is written here.
When uv cannot be had (no pip, no index), exit status 3 and one line saying why on stderr:
the caller falls back to pip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The pin; `make setup UV_VERSION=...` tries another release.
UV_VERSION = os.environ.get("IMGPIPE_UV_VERSION") or "0.13.9"
UNAVAILABLE = 3

# pip option -> (uv variable, how several values are joined for it). Several pip locations
# mean pip's rule "best version from any of them": uv's unsafe-best-match (its default takes
# a package from the first index that has it, which would hide newer releases elsewhere).
PIP_TO_UV = {
    "index-url": ("UV_INDEX_URL", " "),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
    "find-links": ("UV_FIND_LINKS", ","),
    "cert": ("SSL_CERT_FILE", " "),
    "client-cert": ("SSL_CLIENT_CERT", " "),
    "trusted-host": ("UV_INSECURE_HOST", " "),
    "timeout": ("UV_HTTP_TIMEOUT", " "),
    "default-timeout": ("UV_HTTP_TIMEOUT", " "),
}
# Later sections win: pip's own order of precedence (environment variables last).
SECTIONS = ("global", "install", ":env:")


def pip_settings(python: str = sys.executable) -> dict[str, str]:
    """pip's effective value of each option we map, as `pip config list` prints them."""
    try:
        out = subprocess.run(
            [python, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}  # no pip here: nothing configured for it either
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in SECTIONS or option not in PIP_TO_UV:
            continue
        rank = SECTIONS.index(section)
        if option not in found or rank >= found[option][0]:
            found[option] = (rank, value.strip().strip("'\""))
    return {option: value for option, (_, value) in found.items()}


def uv_environment(settings: dict[str, str], environ: dict[str, str]) -> dict[str, str]:
    """The variables to add for uv: each pip setting under uv's name, unless the user set it."""
    added: dict[str, str] = {}
    for option, value in settings.items():
        name, joiner = PIP_TO_UV[option]
        if name in environ or name in added or not value.split():
            continue
        added[name] = joiner.join(value.split())
    several = len(settings.get("extra-index-url", "").split()) + bool(settings.get("find-links"))
    if several and "UV_INDEX_STRATEGY" not in environ:
        added["UV_INDEX_STRATEGY"] = "unsafe-best-match"
    return added


def redacted(value: str) -> str:
    """Text without the passwords of the URLs in it (index URLs may carry credentials)."""
    return re.sub(r"(://[^/:@\s]+:)[^@\s/]+@", r"\1***@", value)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def local_wheels(settings: dict[str, str], lock: Path) -> list[Path]:
    """The wheels of the lock's versions that pip would take from this machine's disk."""
    pins: dict[str, set[str]] = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line):
            pins.setdefault(canonical(match[1]), set()).add(match[2])

    def locked(wheel: Path) -> bool:
        name, version = wheel.name.split("-")[:2]
        return wheel.suffix == ".whl" and version.split("+")[0] in pins.get(canonical(name), ())

    def folder(location: str) -> Path | None:
        if "://" in location and not location.startswith("file://"):
            return None
        path = Path(location.removeprefix("file://"))
        return path if path.is_dir() else None

    found: list[Path] = []
    for location in settings.get("find-links", "").split():
        if (path := folder(location)) is not None:
            found += [wheel for wheel in path.glob("*.whl") if locked(wheel)]
    indexes = f"{settings.get('index-url', '')} {settings.get('extra-index-url', '')}"
    for location in indexes.split():
        if (root := folder(location)) is None:
            continue
        for name in pins:
            page = root / name / "index.html"
            if page.is_file():
                links = re.findall(r'href="([^"#]+)', page.read_text(encoding="utf-8"))
                found += [w for w in ((page.parent / h).resolve() for h in links) if locked(w)]
    return sorted(set(found))


def link_wheels(dest: Path, wheels: list[Path]) -> None:
    """DEST holds exactly these wheels: hard links (no copy of gigabytes), else copies."""
    names = {wheel.name for wheel in wheels}
    for old in dest.glob("*.whl"):
        if old.name not in names:
            old.unlink()
    for wheel in wheels:
        target = dest / wheel.name
        if target.exists() and target.stat().st_size == wheel.stat().st_size:
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy2(wheel, target)


def tools_dir() -> Path:
    given = os.environ.get("IMGPIPE_TOOLS_DIR")
    if given:
        return Path(given)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "imgpipe"


def ensure_uv(environ: dict[str, str]) -> Path:
    """The pinned uv, installed with pip on first use; SystemExit(3) with one line if not."""
    home = tools_dir() / f"uv-{UV_VERSION}"
    binary = home / "bin" / "uv"
    if binary.is_file():
        return binary
    home.parent.mkdir(parents=True, exist_ok=True)
    # Installed next to its final place and renamed: a second setup at the same time, or an
    # interrupted one, never sees half a uv.
    staging = Path(tempfile.mkdtemp(prefix=f".uv-{UV_VERSION}-", dir=home.parent))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--quiet",
             "--disable-pip-version-check", "--no-warn-script-location",
             "--root-user-action=ignore", "--target", str(staging), f"uv=={UV_VERSION}"],
            capture_output=True, text=True, env=environ,
        )  # fmt: skip
        if result.returncode != 0 or not (staging / "bin" / "uv").is_file():
            lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"pip exited {result.returncode}"
            if "No module named pip" in result.stderr:
                why = f"{sys.executable} has no pip"
            print(f"uv {UV_VERSION} unavailable ({redacted(why)})", file=sys.stderr)
            raise SystemExit(UNAVAILABLE)
        try:
            staging.rename(home)
        except OSError:
            if not binary.is_file():  # not someone else's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return binary


def main(argv: list[str]) -> int:
    environ = dict(os.environ)
    settings = pip_settings()
    if argv[:1] == ["--lock-indexes"]:
        # A version that an extra index holds is taken from there with all its files: a
        # local torch wheel for this machine alone would hide PyPI's wheels for the others.
        argv = argv[1:]
        settings = {k: v for k, v in settings.items() if k not in ("extra-index-url", "find-links")}
    added = uv_environment(settings, environ)
    if argv[:1] == ["--link-wheels"] and len(argv) == 3:
        link_wheels(Path(argv[1]), local_wheels(settings, Path(argv[2])))
        return 0
    if argv[:1] == ["--settings"]:
        for name, value in sorted(added.items()):
            print(f"{name}={redacted(value)}")
        return 0
    uv = ensure_uv(environ)
    environ.update(added)
    # uv would otherwise download a Python when the given one is missing: use what is here.
    environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    try:
        os.execve(uv, [str(uv), *argv], environ)
    except OSError as exc:
        print(f"uv {UV_VERSION} unavailable ({uv}: {exc.strerror})", file=sys.stderr)
        return UNAVAILABLE
    return 0  # not reached: execve replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
