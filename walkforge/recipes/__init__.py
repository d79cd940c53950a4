"""Model recipes. Each recipe module defines:

- `NAME`, a config dataclass `Config`, `VARIANTS: dict[str, Config]` (always with "tiny");
- `build(cfg) -> torch.nn.Module` (seeded random init is done by the caller);
- `walks(model, cfg) -> Sequential` — the graph walks, with example inputs;
- `KEY_MAP: KeyMap` and `read_checkpoint(folder) -> (cfg, tensors)` for native checkpoints;
- `fake_inputs(cfg, batch, seed) -> dict[str, np.ndarray]` — valid run-time inputs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from walkforge.errors import WalkforgeError
from walkforge.recipes.configs import did_you_mean

RECIPES = {"vae": "walkforge.recipes.vae", "pi0": "walkforge.recipes.pi0"}


def get_recipe(name: str) -> ModuleType:
    if name not in RECIPES:
        raise WalkforgeError(f"unknown recipe '{name}'{did_you_mean(name, RECIPES)}; "
                             f"known: {', '.join(sorted(RECIPES))}")
    return importlib.import_module(RECIPES[name])


def get_variant(recipe: ModuleType, variant: str):
    if variant not in recipe.VARIANTS:
        raise WalkforgeError(
            f"recipe '{recipe.NAME}' has no variant '{variant}'"
            f"{did_you_mean(variant, recipe.VARIANTS)}; known: {', '.join(recipe.VARIANTS)}"
        )
    return recipe.VARIANTS[variant]
