"""The README's rule of who may import whom, checked on every import statement (nested ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"agent", "model", "trainer", "bench", "cli", "synthetic"}
ALLOWED = {
    "model": set(),
    "synthetic": set(),
    "trainer": {"model", "synthetic"},
    "agent": {"model", "synthetic"},
    "bench": {"agent", "model", "trainer", "synthetic"},
    "cli": PACKAGES,
}


def imported_packages(source: str) -> set[str]:
    """The top-level names of every module `source` imports (relative imports stay in their package)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_imported_packages_sees_nested_and_dotted_imports():
    source = "import os\nfrom trainer.synth import generate\ndef f():\n    import agent.logs\n    from . import x\n"
    assert imported_packages(source) == {"os", "trainer", "agent"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_the_layout_allows(package):
    wrong = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name in sorted(imported_packages(path.read_text()) & (PACKAGES - ALLOWED[package] - {package}))
    ]
    assert wrong == []
