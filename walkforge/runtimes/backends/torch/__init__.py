"""`torch`: the recipe's own modules in fp32 on the CPU, rebuilt from the bundle's config and
weights. It is what every engine is compared against, and the fallback where no engine fits.
This backend (and torch-cuda, which reuses `build_model`) is the only runtime code that imports
recipes. Never chosen by `auto`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from walkforge.artifacts.manifest import Manifest
from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import GraphNode
from walkforge.runtimes.kv_pool import PoolSpec
from walkforge.runtimes.values import to_torch, torch_dtype

NAME = "torch"
AUTO = False


def probe() -> str:
    return "" if importlib.util.find_spec("torch") else "needs torch (pip install 'walkforge[compile]')"


def has_target(manifest: Manifest) -> str:
    return "" if manifest.weights.file else "bundle has no reference weights"


class TorchEngine:
    """Runs one walk's torch module on `device`; same interface as every engine."""

    def __init__(self, node: GraphNode, device: str = "cpu") -> None:
        self.name, self.node, self.device = node.name, node, device
        self.inputs, self.outputs, self.aliases = tuple(node.inputs), tuple(node.outputs), dict(node.aliases)

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        with torch.inference_mode():
            args = [to_torch(env[s.name], s.dtype, self.device, s.name) for s in self.inputs]
            out = self.node.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip((s.name for s in self.outputs), out, strict=True))


def build_model(bundle: Any, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any, Any]:
    """(recipe, config, model with the bundle's weights), on `device`, cast to `dtype` if given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from walkforge.artifacts.bundle import require_reference_weights
    from walkforge.recipes import get_recipe
    from walkforge.recipes.configs import from_dict

    require_reference_weights(bundle, f"backend '{NAME}'" if device == "cpu" else "a torch backend")
    recipe = get_recipe(bundle.recipe)
    cfg = from_dict(recipe.config, bundle.typed.config)
    model = recipe.build(cfg)
    weights = bundle.path(bundle.typed.weights.file)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (SafetensorError, RuntimeError) as exc:  # a damaged file, or tensors that do not fit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WalkforgeError(f"cannot load the reference weights {weights.name}: {first}") from None
    return recipe, cfg, model.eval().to(device=device, dtype=dtype)


def load(bundle: Any, options: Any) -> dict[str, TorchEngine]:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    recipe, cfg, model = build_model(bundle)
    return {node.name: TorchEngine(node) for node in recipe.walks(model, cfg).nodes}


def allocate_pool(spec: PoolSpec, device: str = "cpu") -> Any:
    import torch

    return torch.zeros(spec.shape, dtype=torch_dtype(spec.dtype), device=device)
