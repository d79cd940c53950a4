"""`trt`: TensorRT engines built for this GPU (`walkforge build BUNDLE --target trt`, build.py).

A bundle's TensorRT target is only used on the GPU model and TensorRT version it was built with
(`check_compatible`). Values are CUDA torch tensors bound by device address: a tensor handed from
one engine to the next is never copied, and the page pool (a device tensor) is bound as both the
writer's input and its aliased output, so the engine writes it in place. The loop body (pi0's
`denoise`) is replayed from CUDA graphs (runtimes/cuda_graphs.py).

TensorRT and torch are imported lazily, and nothing TensorRT is constructed before `probe()`
passes: a `trt.Runtime` made without a GPU is dead and deserialising with it segfaults.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

from walkforge.artifacts.manifest import Manifest, Target, as_manifest
from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import loop_bodies
from walkforge.runtimes.backends import _cuda
from walkforge.runtimes.backends.torch import allocate_pool as torch_pool
from walkforge.runtimes.kv_pool import PoolSpec

NAME = "trt"
AUTO = True
INSTALL_HINT = "pip install 'walkforge[trt]' on a machine with an NVIDIA GPU"
REBUILD_HINT = "rebuild on this machine with `walkforge build BUNDLE --target trt`"


def probe() -> str:
    """What is missing for TensorRT: the `tensorrt` package, an NVIDIA GPU. Never imports TensorRT."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"needs TensorRT and a GPU: TensorRT is not installed (no 'tensorrt' module): {INSTALL_HINT}"
    if not _gpu_visible():
        return ("needs TensorRT and a GPU: no NVIDIA GPU is visible (no nvidia-smi, CUDA unavailable); "
                "TensorRT engines are built and run on an NVIDIA GPU")
    return ""


def require() -> None:
    """Raise the one-line WalkforgeError `probe()` gives when TensorRT or a GPU is missing."""
    missing = probe()
    if missing:
        raise WalkforgeError(f"backend 'trt' {missing}")


def has_target(manifest: Manifest) -> str:
    targets = manifest.targets.values()
    return "" if any(t.backend == "tensorrt" for t in targets) else "bundle has no TensorRT target"


def _gpu_visible() -> bool:
    return shutil.which("nvidia-smi") is not None or _cuda.cuda_device() == ""


def gpu_info() -> tuple[str, str]:
    """(name, compute capability 'X.Y') of GPU 0, from torch.cuda or nvidia-smi."""
    if _cuda.cuda_device() == "":
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        return torch.cuda.get_device_name(0), f"{major}.{minor}"
    query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "--id=0"]
    try:
        text = subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise WalkforgeError(f"cannot query the GPU with nvidia-smi: {exc}") from None
    name, cc = (part.strip() for part in text.strip().splitlines()[0].rsplit(",", 1))
    return name, cc


def check_compatible(target_entry: Target | Mapping[str, Any], gpu_name: str, cc: str,
                     trt_version: str) -> None:
    """Refuse a TensorRT target built for another GPU model, compute capability or TensorRT version."""
    target = target_entry if isinstance(target_entry, Target) else Target.from_json(target_entry, "target")
    built = (target.gpu, str(target.compute_capability), target.tensorrt_version)
    if built != (gpu_name, str(cc), trt_version):
        raise WalkforgeError(
            f"TensorRT engines were built for {built[0]} (compute capability {built[1]}) with TensorRT "
            f"{built[2]}; this machine has {gpu_name} (compute capability {cc}) with TensorRT "
            f"{trt_version}: {REBUILD_HINT}"
        )


def select_target(manifest: Manifest | Mapping[str, Any], gpu_name: str, cc: str,
                  trt_version: str) -> tuple[str, Target]:
    """(key, entry) of the bundle's TensorRT target that fits this machine."""
    targets = {k: v for k, v in as_manifest(manifest).targets.items() if v.backend == "tensorrt"}
    if not targets:
        raise WalkforgeError(f"bundle has no TensorRT target; {REBUILD_HINT}")
    refusals = []
    for key, entry in targets.items():
        try:
            check_compatible(entry, gpu_name, cc, trt_version)
            return key, entry
        except WalkforgeError as exc:
            refusals.append(exc)
    raise refusals[0]


def load(bundle: Any, options: Any) -> dict[str, Any]:
    """One engine per walk of `bundle` for this machine's GPU (loop bodies graphed)."""
    require()
    import tensorrt as trt

    from walkforge.runtimes.backends.trt.engine import TrtEngine
    from walkforge.runtimes.cuda_graphs import GraphedEngine
    from walkforge.runtimes.engine import Contract

    gpu, cc = gpu_info()
    manifest = bundle.typed
    _, target = select_target(manifest, gpu, cc, trt.__version__)
    graphed = loop_bodies(manifest.plan) if options.cuda_graphs else set()
    contracts = {name: Contract.from_json(bundle.walk(name)) for name in target.walks}
    resident = frozenset(i for c in contracts.values() for i in c.aliases.values())
    engines: dict[str, Any] = {}
    for name, rel in target.walks.items():
        engine = TrtEngine(name, bundle.path(rel), contracts[name])
        engines[name] = GraphedEngine(engine, resident) if name in graphed else engine
    return engines


def allocate_pool(spec: PoolSpec) -> Any:
    return torch_pool(spec, device="cuda")
