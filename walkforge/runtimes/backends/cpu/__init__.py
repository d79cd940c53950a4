"""`cpu`: the bundle's ONNX on onnxruntime's CPUExecutionProvider. Always available.

The page pool is a host numpy array; every run binds it (no copy) as the writer's input and
output through IOBinding, so prefill writes it in place and denoise reads the same memory.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import numpy_dtype
from walkforge.runtimes.engine import Contract
from walkforge.runtimes.kv_pool import PoolSpec

NAME = "cpu"
AUTO = True


ORT_HINT = "pip install 'walkforge[cpu]' (or 'walkforge[cuda]' for onnxruntime-gpu; one of the two)"


def probe() -> str:
    return "" if importlib.util.find_spec("onnxruntime") else f"needs onnxruntime: {ORT_HINT}"


def has_target(manifest: dict[str, Any]) -> str:
    return "" if "cpu" in manifest.get("targets", {}) else "bundle has no ONNX (cpu) target"


def load(bundle: Any, options: Any) -> dict[str, Any]:
    from walkforge.runtimes.backends.cpu.engine import OrtEngine

    target = bundle.manifest["targets"].get("cpu")
    if target is None:
        raise WalkforgeError("bundle has no 'cpu' target")
    return {name: OrtEngine(name, bundle.path(rel), Contract.from_json(bundle.walk(name)),
                            options.threads, options.spinning) for name, rel in target["walks"].items()}


def allocate_pool(spec: PoolSpec) -> np.ndarray:
    return np.zeros(spec.shape, dtype=numpy_dtype(spec.dtype))
