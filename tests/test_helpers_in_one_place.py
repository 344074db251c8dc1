"""The test suite's own layout: helpers written once (tests/helpers.py, or imgpipe.testing when
the bench shares them), conftest.py holding fixtures only, and no test module importing from
conftest. A helper copied into a second test module fails here, naming both places."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), str(p)) for p in sorted(TESTS.glob("*.py"))}


def is_fixture(node: ast.FunctionDef) -> bool:
    return any("fixture" in ast.unparse(d) for d in node.decorator_list)


def body_without_docstring(node: ast.FunctionDef) -> str:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return ast.dump(ast.Module(body=body, type_ignores=[])) + ast.dump(node.args)


def test_no_test_module_imports_from_conftest() -> None:
    found = [
        name
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if (isinstance(node, ast.ImportFrom) and node.module == "conftest")
        or (isinstance(node, ast.Import) and any(a.name == "conftest" for a in node.names))
    ]
    assert not found, f"import helpers from tests/helpers.py or imgpipe.testing: {found}"


def test_conftest_defines_fixtures_only() -> None:
    tree = modules()["conftest.py"]
    others = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and not is_fixture(node)
        and not node.name.startswith("pytest_")  # pytest's hooks belong there too
    ]
    assert not others, f"helpers in conftest.py (move them to tests/helpers.py): {others}"


def test_no_helper_is_written_twice() -> None:
    seen: dict[str, str] = {}
    twice = []
    for name, tree in modules().items():
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("test_"):
                continue
            if is_fixture(node) or (len(node.body) < 2 and len(ast.unparse(node).splitlines()) < 4):
                continue  # per-module fixtures may differ on purpose; one-liners are no copies
            where = f"{name}:{node.lineno} {node.name}"
            key = body_without_docstring(node)
            if key in seen:
                twice.append(f"{seen[key]} = {where}")
            seen.setdefault(key, where)
    assert not twice, f"the same helper written twice (put it in tests/helpers.py): {twice}"
