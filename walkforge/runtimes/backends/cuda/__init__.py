"""`cuda`: the bundle's ONNX on onnxruntime-gpu's CUDAExecutionProvider, every value on the device.

Inputs become device OrtValues, outputs are bound on the device, the page pool is one device
OrtValue (zeroed once) bound as the writer's input and output (written in place), and x_t passes
between denoise steps as a device OrtValue: per step only t, dt, state and the block table are
uploaded, and nothing returns to the host. Not replayed from CUDA graphs: onnxruntime launches on
its own streams and arena (its `enable_cuda_graph` option would need every I/O at fixed addresses).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from walkforge.artifacts.manifest import Manifest
from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import numpy_dtype
from walkforge.runtimes.backends import _cuda
from walkforge.runtimes.engine import Contract
from walkforge.runtimes.kv_pool import PoolSpec
from walkforge.runtimes.values import ort_array

NAME = "cuda"
AUTO = True


def probe() -> str:
    missing = _cuda.onnxruntime_cuda()
    if missing:
        return f"needs {missing}"
    missing = _cuda.cuda_device()
    return f"found no CUDA device: {missing}" if missing else ""


def has_target(manifest: Manifest) -> str:
    return "" if {"cpu", "cuda"} & set(manifest.targets) else "bundle has no ONNX (cpu) target"


def load(bundle: Any, options: Any) -> dict[str, Any]:
    """One engine per walk on the bundle's ONNX (its 'cuda' target, else its 'cpu' one)."""
    from walkforge.runtimes.backends.cuda.engine import OrtCudaEngine

    targets = bundle.typed.targets
    target = targets.get("cuda") or targets.get("cpu")
    if target is None:
        raise WalkforgeError("bundle has no ONNX target ('cpu') for the cuda backend to run")
    return {name: OrtCudaEngine(name, bundle.path(rel), Contract.from_json(bundle.walk(name)))
            for name, rel in target.walks.items()}


def allocate_pool(spec: PoolSpec) -> Any:
    import onnxruntime as ort

    zeros = np.zeros(spec.shape, dtype=numpy_dtype(spec.dtype))
    return ort.OrtValue.ortvalue_from_numpy(ort_array(zeros), "cuda", 0)
