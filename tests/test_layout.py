"""The installed package holds services/ only (pyproject: packages.find include services*),
so production code must not import the test package: it would break outside a checkout."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parent.parent / "services"


def _imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_production_code_never_imports_the_tests() -> None:
    offenders = [
        f"{path.relative_to(SERVICES.parent)}: {name}"
        for path in sorted(SERVICES.rglob("*.py"))
        for name in _imported_modules(path)
        if name == "tests" or name.startswith("tests.")
    ]
    assert not offenders, offenders
