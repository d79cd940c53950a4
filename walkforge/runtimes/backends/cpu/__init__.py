"""`cpu`: the bundle's ONNX on onnxruntime's CPUExecutionProvider. Always available.

The page pool is a host numpy array; every run binds it (no copy) as the writer's input and
output through IOBinding, so prefill writes it in place and denoise reads the same memory.
Each session runs on `threads` intra-op threads, by default every physical core; only a loop
body's keep spinning after a run (graphs.ort.STOP_SPINNING_AFTER_RUN). An int8 bundle's
sessions fuse its Q/DQ into onnxruntime's integer kernels (graphs/ort.py).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from walkforge.artifacts.manifest import Manifest
from walkforge.errors import WalkforgeError
from walkforge.graphs.ort import ORT_HINT
from walkforge.graphs.walk import loop_bodies, numpy_dtype
from walkforge.runtimes.engine import Contract
from walkforge.runtimes.kv_pool import PoolSpec

NAME = "cpu"
AUTO = True


def probe() -> str:
    return "" if importlib.util.find_spec("onnxruntime") else f"needs onnxruntime: {ORT_HINT}"


BF16_REFUSAL = ("bf16 engines run on cuda/trt (onnxruntime's CPU provider has no bf16 GEMMs); on CPU "
                "compile with --precision fp32 or int8, or check a bf16 graph with "
                "walkforge.graphs.bf16.emulate_bf16 (what the compile's own bf16 check runs)")


def has_target(manifest: Manifest) -> str:
    if manifest.precision.weights == "bf16":
        return BF16_REFUSAL
    return "" if "cpu" in manifest.targets else "bundle has no ONNX (cpu) target"


def physical_cores() -> int:
    """Physical cores of this machine (SMT siblings counted once), from Linux's CPU topology;
    `os.cpu_count()` where that is unreadable. The engines' default thread count: a second
    thread on a core's sibling only competes for the same GEMM units."""
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


def load(bundle: Any, options: Any) -> dict[str, Any]:
    from walkforge.runtimes.backends.cpu.engine import OrtEngine

    manifest = bundle.typed
    target = manifest.targets.get("cpu")
    if target is None:
        raise WalkforgeError("bundle has no 'cpu' target")
    if manifest.precision.weights == "bf16":
        raise WalkforgeError(BF16_REFUSAL)
    int8 = manifest.precision.activations == "int8"  # fuse its Q/DQ
    weight_max = manifest.precision.int8_weight_max or 127  # None unless int8 (upgrade fills old ones)
    threads = options.threads or physical_cores()
    looped = loop_bodies(manifest.plan)  # run again right after themselves
    return {name: OrtEngine(name, bundle.path(rel), Contract.from_json(bundle.walk(name)),
                            threads, options.spinning, fuse_qdq=int8, prepack=options.prepack,
                            int8_weight_max=weight_max, spin_after_run=name in looped)
            for name, rel in target.walks.items()}


def allocate_pool(spec: PoolSpec) -> np.ndarray:
    return np.zeros(spec.shape, dtype=numpy_dtype(spec.dtype))
