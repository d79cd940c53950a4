"""Which engine backend can run here, and `auto`: probes that build nothing.

    cpu         onnxruntime CPUExecutionProvider on the bundle's ONNX; always available
    torch       the recipe's torch modules on CPU in fp32: the reference
    torch-cuda  the recipe's modules on a CUDA device in bf16, Triton kernels for the custom ops,
                the loop body replayed from a CUDA graph (runtimes/cuda.py)
    cuda        the bundle's ONNX on onnxruntime-gpu's CUDAExecutionProvider, values on the device
    trt         TensorRT engines built for this GPU (runtimes/tensorrt.py)
    auto        the first of trt → cuda → torch-cuda → cpu that can run here

Probes look at installed packages and build flags before they touch a device: nothing here
constructs a TensorRT object or an onnxruntime session, and CUDA is not initialised on a
machine whose torch has no CUDA build. An explicit backend that cannot run raises a one-line
WalkforgeError naming what is missing.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

from walkforge.errors import WalkforgeError

logger = logging.getLogger(__name__)

BACKENDS = ("cpu", "torch", "torch-cuda", "cuda", "trt")
AUTO_ORDER = ("trt", "cuda", "torch-cuda", "cpu")
GPU_BACKENDS = ("torch-cuda", "cuda", "trt")


def cuda_device() -> tuple[bool, str]:
    """(True, "") where torch sees a CUDA device; else (False, what is missing).

    A CPU-only torch build is recognised from `torch.version.cuda` without touching CUDA.
    """
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed"
    import torch

    if torch.version.cuda is None:
        return False, f"this torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, ""


def onnxruntime_cuda() -> tuple[bool, str]:
    """(True, "") where onnxruntime offers CUDAExecutionProvider; else (False, what it offers)."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return True, ""
    return False, (f"onnxruntime-gpu with CUDAExecutionProvider; this onnxruntime {ort.__version__} "
                   f"has {', '.join(providers)} only")


def probe(name: str) -> tuple[bool, str]:
    """(True, "") where backend `name` can run here; else (False, one line naming what is missing)."""
    if name in ("cpu", "torch"):
        return True, ""
    if name == "trt":
        from walkforge.runtimes import tensorrt

        ok, reason = tensorrt.probe()
        return ok, "" if ok else f"backend 'trt' needs TensorRT and a GPU: {reason}"
    if name == "cuda":
        ok, reason = onnxruntime_cuda()
        if not ok:
            return False, f"backend 'cuda' needs {reason}"
    elif name == "torch-cuda":
        if importlib.util.find_spec("triton") is None:
            return False, "backend 'torch-cuda' needs Triton (no 'triton' module)"
    else:
        raise WalkforgeError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}, auto")
    ok, reason = cuda_device()
    return ok, "" if ok else f"backend '{name}' found no CUDA device: {reason}"


def available_backends() -> list[str]:
    """Backends that can run on this machine, in BACKENDS order (cpu and torch always)."""
    return [name for name in BACKENDS if probe(name)[0]]


def _has_target(manifest: Mapping[str, Any] | None, name: str) -> tuple[bool, str]:
    """Whether the bundle holds what backend `name` runs (trt: a TensorRT target; cuda: ONNX)."""
    if manifest is None:
        return True, ""
    targets = manifest.get("targets", {})
    if name == "trt" and not any(t.get("backend") == "tensorrt" for t in targets.values()):
        return False, "bundle has no TensorRT target"
    if name in ("cpu", "cuda") and not ({"cpu", "cuda"} & set(targets)):
        return False, "bundle has no ONNX (cpu) target"
    return True, ""


def resolve_backend(name: str, manifest: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(backend, reason). `auto` takes the first of AUTO_ORDER that runs here (and, given a
    bundle `manifest`, that the bundle has a target for); an explicit name is checked and raises
    a one-line WalkforgeError when this machine lacks what it needs. cpu and torch probe nothing.
    """
    if name != "auto":
        ok, reason = probe(name)
        if not ok:
            raise WalkforgeError(reason)
        return name, "requested"
    skipped = []
    for candidate in AUTO_ORDER:
        ok, reason = probe(candidate)
        if ok:
            ok, reason = _has_target(manifest, candidate)
        if ok:
            why = f"auto chose {candidate}" + (f" ({'; '.join(skipped)})" if skipped else "")
            logger.info(why)
            return candidate, why
        skipped.append(f"not {candidate}: {reason}")
    raise WalkforgeError("auto found no backend: " + "; ".join(skipped))


def gpu_engines(bundle: Any, backend: str) -> dict[str, Any]:
    """One engine per walk of `bundle` on a GPU backend (torch-cuda, cuda, trt)."""
    if backend == "trt":
        from walkforge.runtimes.tensorrt import trt_engines

        return trt_engines(bundle)
    if backend == "cuda":
        from walkforge.runtimes.cuda import ort_cuda_engines

        return ort_cuda_engines(bundle)
    if backend == "torch-cuda":
        from walkforge.runtimes.cuda import torch_cuda_engines

        return torch_cuda_engines(bundle)
    raise WalkforgeError(f"'{backend}' is not a GPU backend; GPU backends: {', '.join(GPU_BACKENDS)}")
