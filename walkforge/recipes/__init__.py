"""Model recipes: one package per model family, each exposing a `Recipe` as `RECIPE`
(see recipes/recipe.py for what it declares and docs/adding_a_recipe.md for how to add one).
"""

from __future__ import annotations

import importlib

from walkforge.errors import WalkforgeError, did_you_mean
from walkforge.recipes.recipe import Recipe

# name → the package that exposes its RECIPE; one line per recipe.
RECIPES = {
    "vae": "walkforge.recipes.vae",
    "pi0": "walkforge.recipes.pi0",
    "pi05": "walkforge.recipes.pi05",
    "smolvla": "walkforge.recipes.smolvla",
    "bagel": "walkforge.recipes.bagel",
}

__all__ = ["RECIPES", "Recipe", "get_recipe"]


def get_recipe(name: str) -> Recipe:
    """The registered recipe `name`; an unknown name is a user error with a did-you-mean."""
    if name not in RECIPES:
        raise WalkforgeError(f"unknown recipe '{name}'{did_you_mean(name, RECIPES)}; "
                             f"known: {', '.join(sorted(RECIPES))}")
    recipe = importlib.import_module(RECIPES[name]).RECIPE
    if recipe.name != name:
        raise TypeError(f"{RECIPES[name]}.RECIPE is named '{recipe.name}', registered as '{name}'")
    return recipe
