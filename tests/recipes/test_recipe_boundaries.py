"""A new model is one package: a recipe imports shared code (recipes/blocks/, recipes/lerobot.py,
the compiler's layers), never another recipe's modules, and nobody's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import walkforge.recipes

RECIPES = Path(walkforge.recipes.__file__).parent
PACKAGES = sorted(p.name for p in RECIPES.iterdir() if (p / "__init__.py").is_file() and p.name != "blocks")


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every `from … import …` and `import …` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_a_recipe_imports_no_other_recipe(package):
    others = [p for p in PACKAGES if p != package]
    for path in sorted((RECIPES / package).glob("*.py")):
        for module, _ in imports(path):
            parts = module.split(".")
            assert not (parts[:2] == ["walkforge", "recipes"] and len(parts) > 2 and parts[2] in others), (
                f"{path.relative_to(RECIPES)} imports {module}: share it through recipes/blocks/ instead")


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.py")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_no_private_name_crosses_a_module(path):
    for module, names in imports(path):
        private = [n for n in names if n.startswith("_") and n != "__future__"]
        assert not (module.startswith("walkforge.") and private), (
            f"{path.relative_to(RECIPES)} imports private {', '.join(private)} from {module}")


def test_the_rule_sees_the_packages():
    assert {"pi0", "pi05", "vae", "bagel"} <= set(PACKAGES)
