"""`Recipe`: everything the compiler, the tools and the torch backend need to know about one
model family, declared in one value. Each recipe package (`recipes/<name>/`) exposes one as
`RECIPE`; `walkforge.recipes.get_recipe(name)` finds it through the registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from walkforge.errors import WalkforgeError, did_you_mean
from walkforge.graphs.walk import Sequential
from walkforge.recipes.weights import KeyMap

# fake_inputs' own parameters; any others are the recipe's input sizes (vae: height, width).
_FAKE_INPUT_PARAMS = ("cfg", "batch", "seed")


def no_kernels(cfg: Any) -> dict[str, int]:
    """`kernel_shapes` of a recipe whose walks use no plugin kernel."""
    return {}


def no_manifest(cfg: Any) -> dict[str, Any]:
    """`variant_manifest` of a recipe whose random-weights bundles carry no recipe entries."""
    return {}


def no_dims(cfg: Any) -> dict[str, tuple[int, int, int]]:
    """`trt_dims` of a recipe whose only symbolic dims are batch and the KV pages."""
    return {}


@dataclass(frozen=True)
class Recipe:
    """One model family.

    name            the registry name, also stamped into every bundle's manifest
    config          the frozen config dataclass (`--config` JSON fields are its fields)
    variants        named configs, always with "tiny" (what tests and regress compile)
    build           cfg → torch module with default init (the caller seeds it or loads weights)
    walks           (model, cfg, kv_dtype=...) → Sequential: the graph walks with example inputs
    key_map         checkpoint keys → module keys, for `load_strict`
    read_checkpoint (native checkpoint folder, --config overrides) → (cfg, tensors); the overrides
                    are applied before any size is inferred from shapes, and win
    fake_inputs     (cfg, batch, seed, **dims) → valid run-time inputs of the front
    front           the runtime front's name (the runtime resolves it; it never imports recipes)
    precisions      what `walkforge regress` compiles the tiny variant at
    trt_dims        cfg → TensorRT (min, opt, max) of symbolic dims other than batch and the KV pages
    kernel_shapes   cfg → what the plugin kernels are specialised to when compiled ahead of time
    variant_manifest  cfg → manifest entries of a compile without a checkpoint (pi0: the default
                    "policy" entry a LeRobot folder's reader writes from its config)
    tokenizer       (manifest entries so far, --tokenizer folder, cfg) → (manifest entries, extra
                    bundle files): the folder checked and bundled; None: the recipe takes no text
    """

    name: str
    config: type
    variants: Mapping[str, Any]
    build: Callable[[Any], nn.Module]
    walks: Callable[..., Sequential]
    key_map: KeyMap
    read_checkpoint: Callable[[Path, Mapping[str, Any]], tuple[Any, dict[str, torch.Tensor]]]
    fake_inputs: Callable[..., dict[str, np.ndarray]]
    front: str
    precisions: tuple[str, ...] = ("fp32",)
    trt_dims: Callable[[Any], Mapping[str, tuple[int, int, int]]] = no_dims
    kernel_shapes: Callable[[Any], dict[str, int]] = no_kernels
    variant_manifest: Callable[[Any], dict[str, Any]] = no_manifest
    tokenizer: Callable[[Mapping[str, Any], Path, Any], tuple[dict[str, Any], dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        if not is_dataclass(self.config):
            raise TypeError(f"recipe '{self.name}': config must be a dataclass, got {self.config!r}")
        if "tiny" not in self.variants:
            raise TypeError(f"recipe '{self.name}': variants must include 'tiny'")
        for key, cfg in self.variants.items():
            if not isinstance(cfg, self.config):
                raise TypeError(f"recipe '{self.name}': variant '{key}' is not a {self.config.__name__}")
        if not self.precisions:
            raise TypeError(f"recipe '{self.name}': precisions must not be empty")
        for key, cfg in self.variants.items():
            for dim, (lo, opt, hi) in self.trt_dims(cfg).items():
                if not 1 <= lo <= opt <= hi:
                    raise TypeError(f"recipe '{self.name}': trt_dims['{dim}'] of '{key}' = {(lo, opt, hi)} "
                                    "is not 1 ≤ min ≤ opt ≤ max")

    def variant(self, name: str) -> Any:
        """The named config; an unknown name is a user error with a did-you-mean."""
        if name not in self.variants:
            raise WalkforgeError(
                f"recipe '{self.name}' has no variant '{name}'"
                f"{did_you_mean(name, self.variants)}; known: {', '.join(self.variants)}"
            )
        return self.variants[name]

    @property
    def input_dims(self) -> dict[str, Any]:
        """The input sizes `fake_inputs` takes beyond batch and seed, with their defaults."""
        params = inspect.signature(self.fake_inputs).parameters.values()
        return {p.name: p.default for p in params if p.name not in _FAKE_INPUT_PARAMS}
