"""Engine backends behind one registry; `auto` walks it in preference order.

    trt         TensorRT engines built for this GPU (backends/trt)
    cuda        the bundle's ONNX on onnxruntime-gpu's CUDAExecutionProvider, values on the device
    torch-cuda  the recipe's modules on a CUDA device in bf16, Triton kernels, CUDA-graph loops
    cpu         onnxruntime CPUExecutionProvider on the bundle's ONNX; always available
    torch       the recipe's torch modules on CPU in fp32: the reference (never chosen by auto)
    torch-bf16  the same under CPU bf16 autocast: what a torch user on an AMX CPU runs (never auto)

Each backend is one package whose module-level names satisfy the `Backend` Protocol (base.py):
`NAME`, `AUTO` (whether `auto` may pick it), `probe()` (what this machine lacks, "" when it can
run; builds nothing), `has_target(manifest)` (what the bundle lacks for it, ""),
`load(bundle, options) -> {walk: Engine}` and `allocate_pool(spec)` (the page pool, where its
engines read it). `get` checks a backend against it on import. A new backend is one package plus
one line in REGISTRY.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from walkforge.artifacts.manifest import Manifest, as_manifest
from walkforge.errors import WalkforgeError
from walkforge.runtimes.backends.base import Backend, missing_members

log = logging.getLogger(__name__)

REGISTRY = {  # in `auto`'s order of preference
    "trt": "walkforge.runtimes.backends.trt",
    "cuda": "walkforge.runtimes.backends.cuda",
    "torch-cuda": "walkforge.runtimes.backends.torch_cuda",
    "cpu": "walkforge.runtimes.backends.cpu",
    "torch": "walkforge.runtimes.backends.torch",
    "torch-bf16": "walkforge.runtimes.backends.torch_bf16",
}
BACKENDS = tuple(REGISTRY)
CHOICES = (*BACKENDS, "auto")


@dataclass(frozen=True)
class Options:
    """How engines are made: onnxruntime/torch threads, onnxruntime spinning (off for in-process
    parity with torch), CUDA-graph replay of loop bodies on the GPU backends, onnxruntime's
    prepacked weights (off: the compiler's memory-lean sessions, graphs.ort.session_options)."""

    threads: int | None = None
    spinning: bool = True
    cuda_graphs: bool = True
    prepack: bool = True


def get(name: str) -> Backend:
    """The backend package `name` (imported on first use), checked against the `Backend` Protocol."""
    if name not in REGISTRY:
        raise WalkforgeError(f"unknown backend '{name}'; choose one of {', '.join(CHOICES)}")
    module = importlib.import_module(REGISTRY[name])
    if not isinstance(module, Backend):  # a bug in walkforge, not the user's: keep the traceback
        raise TypeError(f"backend '{name}' ({module.__name__}) is not a Backend: "
                        f"it lacks {missing_members(module)}")
    return module


def probe(name: str) -> tuple[bool, str]:
    """(True, "") where backend `name` can run here; else (False, one line naming what is missing)."""
    missing = get(name).probe()
    return (False, f"backend '{name}' {missing}") if missing else (True, "")


def available_backends() -> list[str]:
    """Backends that can run on this machine, in registry order."""
    return [name for name in BACKENDS if probe(name)[0]]


def resolve(name: str, manifest: Manifest | Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(backend, reason). `auto` takes the first backend of REGISTRY that may be auto-chosen, runs
    here and (given a bundle `manifest`, typed or as JSON) has a target in the bundle; an explicit
    name is checked and raises a one-line WalkforgeError when this machine lacks what it needs."""
    if name != "auto":
        ok, reason = probe(name)
        if not ok:
            raise WalkforgeError(reason)
        return name, "requested"
    skipped = []
    for candidate in BACKENDS:
        if not get(candidate).AUTO:
            continue
        ok, reason = probe(candidate)
        if ok and manifest is not None:
            missing = get(candidate).has_target(as_manifest(manifest))
            ok, reason = not missing, missing
        if ok:
            why = f"auto chose {candidate}" + (f" ({'; '.join(skipped)})" if skipped else "")
            log.info(why)
            return candidate, why
        skipped.append(f"not {candidate}: {reason}")
    raise WalkforgeError("auto found no backend: " + "; ".join(skipped))
