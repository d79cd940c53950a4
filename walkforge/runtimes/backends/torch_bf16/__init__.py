"""`torch-bf16`: the recipe's modules on the CPU under bf16 autocast — what a torch user on a CPU
with AMX/AVX-512 BF16 runs instead of fp32 (oneDNN's bf16 GEMMs), so the second reference
`walkforge bench` compares engines with. Weights stay float32 (autocast casts them per GEMM);
engine inputs and outputs keep the bundle's contract dtypes. walkforge's custom ops (the page
pool's writer and reader) run in float32 under CPU autocast: their inputs are cast up, as for
any op autocast does not list. Never chosen by `auto`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from walkforge.runtimes.backends.torch import TorchEngine, allocate_pool, has_target, probe
from walkforge.runtimes.backends.torch import load as load_fp32
from walkforge.runtimes.values import torch_dtype

NAME = "torch-bf16"
AUTO = False
__all__ = ["NAME", "AUTO", "probe", "has_target", "load", "allocate_pool", "Bf16Engine"]


class Bf16Engine(TorchEngine):
    """A torch engine whose module runs under CPU bf16 autocast; outputs in contract dtypes."""

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = super().run(env)
        return {s.name: out[s.name].to(torch_dtype(s.dtype)) for s in self.outputs}


@functools.cache
def _custom_ops_in_fp32() -> None:
    import torch

    from walkforge.plugins.constants import DOMAIN

    for op in ("kv_cache_write", "paged_attention"):
        torch.library.register_autocast(f"{DOMAIN}::{op}", "cpu", torch.float32)


def load(bundle: Any, options: Any) -> dict[str, Bf16Engine]:
    engines = load_fp32(bundle, options)  # imports the recipe, which registers the custom ops
    _custom_ops_in_fp32()
    return {name: Bf16Engine(engine.node) for name, engine in engines.items()}
