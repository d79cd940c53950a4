"""The layer rules of docs/design.md, checked on the source: data flows recipe → compiler → artifacts
→ runtimes, the compiler is handed a runtime and never imports one, and the runtime imports
recipes only in the torch reference backends."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "walkforge"


def imports(folder: str) -> dict[str, set[str]]:
    """walkforge modules imported (at any depth of the code) by each file under `folder`."""
    found = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(PACKAGE))] = {n for n in names if n.startswith("walkforge")}
    return found


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("compiler", ("walkforge.runtimes", "walkforge.tools", "walkforge.cli")),
    ("runtimes", ("walkforge.compiler", "walkforge.tools", "walkforge.cli")),
    ("graphs", ("walkforge.compiler", "walkforge.runtimes", "walkforge.recipes", "walkforge.tools")),
    ("plugins", ("walkforge.compiler", "walkforge.runtimes", "walkforge.recipes", "walkforge.tools")),
    ("artifacts", ("walkforge.compiler", "walkforge.runtimes", "walkforge.recipes", "walkforge.tools")),
    ("recipes", ("walkforge.compiler", "walkforge.runtimes", "walkforge.tools")),
])  # fmt: skip
def test_layers_import_only_downwards(folder, forbidden):
    bad = {f: sorted(n for n in names if n.startswith(forbidden)) for f, names in imports(folder).items()}
    assert not {f: n for f, n in bad.items() if n}


def test_only_the_torch_backends_import_recipes():
    users = {f for f, names in imports("runtimes").items()
             if any(n.startswith("walkforge.recipes") for n in names)}
    assert users <= {"runtimes/backends/torch/__init__.py"}
