"""Example run-time inputs for a bundle, made by its recipe's `fake_inputs` (seeded)."""

from __future__ import annotations

from typing import Any

import numpy as np

from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError, did_you_mean
from walkforge.recipes import get_recipe
from walkforge.recipes.configs import from_dict


def example_inputs(bundle: Bundle, batch: int = 1, seed: int = 0, **dims: Any) -> dict[str, np.ndarray]:
    """Valid inputs for `bundle`'s front API (`run`), keyed by input name."""
    recipe = get_recipe(bundle.recipe)
    known = list(recipe.input_dims)
    for name in dims:
        if name not in known:
            raise WalkforgeError(f"recipe '{bundle.recipe}' has no input size '{name}'"
                                 f"{did_you_mean(name, known)}; sizes: {', '.join(known) or 'none'}")
    cfg = from_dict(recipe.config, bundle.manifest["config"])
    return recipe.fake_inputs(cfg, batch=batch, seed=seed, **dims)
