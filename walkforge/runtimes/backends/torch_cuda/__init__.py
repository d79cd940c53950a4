"""`torch-cuda`: the recipe's walk modules on a CUDA device with bf16 weights under bf16 autocast.

Engine inputs and outputs keep the bundle's contract dtypes (float32), so x_t and the page pool
stay float32 between walks. The custom ops get CUDA kernels that call the Triton launchers
(`walkforge.plugins.register_cuda_kernels`), so model code has no hardware branch. The loop body
(pi0's denoise) is replayed from CUDA graphs (runtimes/cuda_graphs.py).

The page pool is a device tensor for the loaded bundle's lifetime. `kv_cache_write` is
functional (a torch custom op may not return its input), so prefill's updated copy is copied
back into the pool: one device-side pool copy per call, none per denoise step, and the graphed
denoise reads the pool by address.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from walkforge.artifacts.manifest import Manifest
from walkforge.graphs.walk import GraphNode, Sequential, loop_bodies
from walkforge.runtimes.backends import _cuda
from walkforge.runtimes.backends.torch import allocate_pool as torch_pool
from walkforge.runtimes.backends.torch import build_model
from walkforge.runtimes.cuda_graphs import GraphedEngine
from walkforge.runtimes.kv_pool import PoolSpec
from walkforge.runtimes.values import to_torch, torch_dtype

NAME = "torch-cuda"
AUTO = True


def probe() -> str:
    if importlib.util.find_spec("triton") is None:
        return "needs Triton (no 'triton' module)"
    missing = _cuda.cuda_device()
    return f"found no CUDA device: {missing}" if missing else ""


def has_target(manifest: Manifest) -> str:
    return "" if manifest.weights.file else "bundle has no reference weights"


class TorchCudaEngine:
    """One walk's module on CUDA in bf16; `forward` is what a CUDA graph captures."""

    device = "cuda"

    def __init__(self, node: GraphNode) -> None:
        self.name, self.node = node.name, node
        self.inputs, self.outputs, self.aliases = tuple(node.inputs), tuple(node.outputs), dict(node.aliases)

    def forward(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The module on device tensors by name, on the current stream; outputs in contract dtypes."""
        import torch

        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = self.node.module(*(args[s.name] for s in self.inputs))
        out = out if isinstance(out, tuple) else (out,)
        return {s.name: o.to(torch_dtype(s.dtype)) for s, o in zip(self.outputs, out, strict=True)}

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        with torch.inference_mode():
            args = {s.name: to_torch(env[s.name], s.dtype, "cuda", s.name) for s in self.inputs}
            outputs = self.forward(args)
            for out, inp in self.aliases.items():  # in place, as far as the chain can tell
                if outputs[out].data_ptr() != args[inp].data_ptr():
                    args[inp].copy_(outputs[out])
                outputs[out] = args[inp]
        return outputs


def walk_engines(walks: Sequential, cuda_graphs: bool = True) -> dict[str, Any]:
    """Engines for walks whose modules already sit on the GPU in bf16."""
    from walkforge.plugins import register_cuda_kernels

    register_cuda_kernels()
    resident = frozenset(name for node in walks.nodes for name in node.aliases.values())
    graphed = loop_bodies(walks.plan()) if cuda_graphs else set()
    engines: dict[str, Any] = {}
    for node in walks.nodes:
        engine = TorchCudaEngine(node)
        engines[node.name] = GraphedEngine(engine, resident) if node.name in graphed else engine
    return engines


def load(bundle: Any, options: Any) -> dict[str, Any]:
    import torch

    recipe, cfg, model = build_model(bundle, "cuda", dtype=torch.bfloat16)
    return walk_engines(recipe.walks(model, cfg), options.cuda_graphs)


def allocate_pool(spec: PoolSpec) -> Any:
    return torch_pool(spec, device="cuda")
