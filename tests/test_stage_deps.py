"""dvc.yaml declares what each stage depends on, by one rule the tests enforce.

Code: every module of the package that a stage's entry point imports, directly or
through other modules, lazily inside functions included (a package folder stands for
all its modules). Params: every key that changes a result (declared once, in
``imgpipe.config``) is a param of each stage it affects. A change that escapes the
rule would leave results of code or values that no longer exist in DVC's cache.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from imgpipe.config import SWEEP, result_keys
from imgpipe.testing import REPO

SRC = REPO / "src"
# Each stage's entry point, and the parts of the package it cannot reach on the
# stage's own command: `make train` never passes --multirun, so the sweep it
# would dispatch to is the sweep stage's code, not the train stage's.
ENTRY_POINTS = {
    "process_data": ("src/process_data.py", ()),
    "train": ("src/train_model.py", ("imgpipe.sweep",)),
    "sweep": ("src/train_model.py", ()),
    "predict": ("src/predict.py", ()),
}


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Names of the project's modules that ``path`` imports anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            # `from imgpipe import checkpoint` imports a module, not a name
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        if name.split(".")[0] != "imgpipe":
            continue
        parts = name.split(".")
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if module_file(prefix) is not None:
                found.add(prefix)
    return found


def closure(entry: str, unreachable: tuple[str, ...]) -> set[Path]:
    seen: set[str] = set()
    todo = sorted(imported_modules(REPO / entry))
    while todo:
        name = todo.pop()
        if name in seen or any(name == u or name.startswith(u + ".") for u in unreachable):
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)))
    return {REPO / entry} | {module_file(name) for name in seen}


def stage(name: str) -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_each_stage_depends_on_exactly_the_code_it_imports(name: str) -> None:
    entry, unreachable = ENTRY_POINTS[name]
    imported = closure(entry, unreachable)
    declared: set[Path] = set()
    for dep in (dep for dep in stage(name)["deps"] if dep.startswith("src/")):
        path = REPO / dep
        assert path.exists(), f"dvc.yaml stage {name}: dep {dep} does not exist"
        if path.is_dir():  # a package: the stage must import it
            assert path / "__init__.py" in imported, f"stage {name} never imports {dep}"
            declared |= set(path.rglob("*.py"))
        else:
            assert path in imported, f"stage {name} depends on {dep}, which it never imports"
            declared.add(path)
    missing = sorted(str(p.relative_to(REPO)) for p in imported - declared)
    assert not missing, f"dvc.yaml stage {name} misses deps on {missing}"


def test_keys_that_change_a_result_are_params_of_train_and_sweep() -> None:
    conf = yaml.safe_load((REPO / "conf" / "train_model.yaml").read_text())
    searched = set(conf["hydra"]["sweeper"]["params"])
    keys = set(result_keys())
    assert keys <= set(stage("train")["params"])
    # The sweep searches some keys itself: the others are its params, with the pruner's
    # (they change which trials complete: the sweep's result), and nothing more.
    assert set(stage("sweep")["params"]) == (keys - searched) | set(result_keys(SWEEP))
