"""The torch reference backend: the recipe's own modules, rebuilt from the bundle's config and
weights. It is what every engine is compared against, and the fallback where no engine fits.
This is the only runtime module that imports recipes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from walkforge.artifacts.bundle import Bundle
from walkforge.graphs.walk import GraphNode
from walkforge.recipes import get_recipe
from walkforge.recipes.configs import from_dict

Value = np.ndarray | torch.Tensor


class TorchEngine:
    """Runs one walk's torch module; same interface as OrtEngine."""

    def __init__(self, node: GraphNode, device: str = "cpu") -> None:
        self.name = node.name
        self.node = node
        self.inputs = list(node.inputs)
        self.outputs = list(node.outputs)
        self.aliases = dict(node.aliases)
        self.device = device

    @torch.inference_mode()
    def run(self, env: Mapping[str, Value]) -> dict[str, torch.Tensor]:
        args = [to_tensor(env[s.name], self.device) for s in self.inputs]
        out = self.node.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip((s.name for s in self.outputs), out, strict=True))


def build_model(bundle: Bundle, device: str = "cpu", dtype: torch.dtype | None = None
                ) -> tuple[Any, Any, torch.nn.Module]:
    """(recipe module, config, model with the bundle's weights), on `device`, cast to `dtype` if given."""
    recipe = get_recipe(bundle.recipe)
    cfg = from_dict(recipe.Config, bundle.manifest["config"])
    model = recipe.build(cfg)
    model.load_state_dict(load_file(str(bundle.path(bundle.manifest["weights"]["file"]))), strict=True)
    return recipe, cfg, model.eval().to(device=device, dtype=dtype)


def torch_engines(bundle: Bundle, device: str = "cpu") -> dict[str, TorchEngine]:
    recipe, cfg, model = build_model(bundle, device)
    walks = recipe.walks(model, cfg)
    return {node.name: TorchEngine(node, device) for node in walks.nodes}


def to_tensor(value: Value, device: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return torch.from_numpy(np.ascontiguousarray(value)).to(device)
