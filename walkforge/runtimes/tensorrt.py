"""TensorRT engine backend: one deserialised plan per walk, values as CUDA torch tensors.

A bundle's TensorRT target is only used on the GPU model and TensorRT version it was built with
(`check_compatible`). Inputs are bound by device address: a tensor handed from one engine to the
next is never copied, and an output listed in the walk's `aliases` (the KV page pool) is bound
to the very address of its input, so the engine writes the pool in place. The loop body (pi0's
`denoise`) runs as a captured CUDA graph (`GraphedEngine`): per step only the small carried
inputs are copied into the graph's static buffers before a replay.

TensorRT and torch are imported lazily, and nothing TensorRT is constructed before `probe()`
passes: a `trt.Runtime` made without a GPU is dead and deserialising with it segfaults.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import TensorSpec

INSTALL_HINT = ("pip install 'walkforge[trt]' "
                "on a machine with an NVIDIA GPU")  # fmt: skip
REBUILD_HINT = "rebuild on this machine with `walkforge build BUNDLE --target trt`"
_RUNTIME: Any = None


# ---------------------------------------------------------------- availability (no TensorRT objects)


def probe() -> tuple[bool, str]:
    """(True, "") where TensorRT and an NVIDIA GPU are present; else (False, one-line reason).

    Looks for the `tensorrt` package and asks nvidia-smi / torch.cuda; never imports TensorRT.
    """
    if importlib.util.find_spec("tensorrt") is None:
        return False, f"TensorRT is not installed (no 'tensorrt' module): {INSTALL_HINT}"
    if not _gpu_visible():
        return False, ("no NVIDIA GPU is visible (no nvidia-smi, CUDA unavailable); TensorRT engines "
                       "are built and run on an NVIDIA GPU")
    return True, ""


def require() -> None:
    """Raise the one-line WalkforgeError `probe()` gives when TensorRT or a GPU is missing."""
    ok, reason = probe()
    if not ok:
        raise WalkforgeError(reason)


def _gpu_visible() -> bool:
    if shutil.which("nvidia-smi") is not None:
        return True
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def gpu_info() -> tuple[str, str]:
    """(name, compute capability 'X.Y') of GPU 0, from torch.cuda or nvidia-smi."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return torch.cuda.get_device_name(0), f"{major}.{minor}"
    query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "--id=0"]
    try:
        text = subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise WalkforgeError(f"cannot query the GPU with nvidia-smi: {exc}") from None
    name, cc = (part.strip() for part in text.strip().splitlines()[0].rsplit(",", 1))
    return name, cc


# ---------------------------------------------------------------- target selection (pure)


def check_compatible(target_entry: Mapping[str, Any], gpu_name: str, cc: str, trt_version: str) -> None:
    """Refuse a TensorRT target built for another GPU model, compute capability or TensorRT version."""
    built_trt = target_entry.get("versions", {}).get("tensorrt")
    built = (target_entry.get("gpu"), str(target_entry.get("compute_capability")), built_trt)
    if built != (gpu_name, str(cc), trt_version):
        raise WalkforgeError(
            f"TensorRT engines were built for {built[0]} (compute capability {built[1]}) with TensorRT "
            f"{built[2]}; this machine has {gpu_name} (compute capability {cc}) with TensorRT "
            f"{trt_version}: {REBUILD_HINT}"
        )


def select_target(manifest: Mapping[str, Any], gpu_name: str, cc: str,
                  trt_version: str) -> tuple[str, dict[str, Any]]:
    """(key, entry) of the bundle's TensorRT target that fits this machine."""
    targets = {k: v for k, v in manifest.get("targets", {}).items() if v.get("backend") == "tensorrt"}
    if not targets:
        raise WalkforgeError(f"bundle has no TensorRT target; {REBUILD_HINT}")
    refusals = []
    for key, entry in targets.items():
        try:
            check_compatible(entry, gpu_name, cc, trt_version)
            return key, dict(entry)
        except WalkforgeError as exc:
            refusals.append(exc)
    raise refusals[0]


def loop_bodies(plan: list[Any]) -> set[str]:
    """Walks the plan runs in a Loop (captured as CUDA graphs)."""
    return {step["loop"] for step in plan if isinstance(step, Mapping)}


# ---------------------------------------------------------------- engines


def trt_engines(bundle: Any, cuda_graphs: bool = True) -> dict[str, Any]:
    """One engine per walk of `bundle` (an artifacts.bundle.Bundle) for this machine's GPU."""
    require()
    import tensorrt as trt

    gpu, cc = gpu_info()
    _, target = select_target(bundle.manifest, gpu, cc, trt.__version__)
    graphed = loop_bodies(bundle.manifest.get("plan", [])) if cuda_graphs else set()
    engines: dict[str, Any] = {}
    for name, rel in target["walks"].items():
        engine = TrtEngine(name, bundle.path(rel), bundle.walk(name))
        engines[name] = GraphedEngine(engine) if name in graphed else engine
    return engines


def _runtime() -> Any:
    global _RUNTIME
    if _RUNTIME is None:
        require()
        import tensorrt as trt

        _RUNTIME = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    return _RUNTIME


class TrtEngine:
    """Runs one walk's TensorRT plan; same interface as OrtEngine (name, inputs, outputs, aliases, run)."""

    def __init__(self, name: str, path: Path, contract: Mapping[str, Any]) -> None:
        import torch

        self.name = name
        self.inputs = [TensorSpec.from_json(s) for s in contract["inputs"]]
        self.outputs = [TensorSpec.from_json(s) for s in contract["outputs"]]
        self.aliases = dict(contract.get("aliases", {}))
        self.engine = _runtime().deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise WalkforgeError(f"walk '{name}': TensorRT cannot deserialise {Path(path).name}; "
                                 f"{REBUILD_HINT}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.device = "cuda"

    def bind(self, env: Mapping[str, Any]) -> dict[str, Any]:
        """Set input shapes and every I/O address; returns the bound tensors by name.

        Inputs already on the GPU are bound where they are. Aliased outputs get their input's
        address (written in place); other outputs are allocated once their shape is known.
        """
        import torch

        bound: dict[str, Any] = {}
        with torch.cuda.stream(self.stream):
            for spec in self.inputs:
                bound[spec.name] = to_device(env[spec.name], spec.dtype)
                self.context.set_input_shape(spec.name, tuple(bound[spec.name].shape))
                self.context.set_tensor_address(spec.name, bound[spec.name].data_ptr())
            for spec in self.outputs:
                if spec.name in self.aliases:
                    bound[spec.name] = bound[self.aliases[spec.name]]
                else:
                    shape = tuple(self.context.get_tensor_shape(spec.name))
                    bound[spec.name] = torch.empty(shape, dtype=torch_dtype(spec.dtype), device="cuda")
                self.context.set_tensor_address(spec.name, bound[spec.name].data_ptr())
        return bound

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise WalkforgeError(f"walk '{self.name}': TensorRT failed to enqueue the engine")

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        """Bind inputs from `env` by name, run, return outputs (CUDA tensors) by name."""
        bound = self.bind(env)
        self.enqueue()
        self.stream.synchronize()
        return {spec.name: bound[spec.name] for spec in self.outputs}


@dataclass
class _Capture:
    graph: Any  # torch.cuda.CUDAGraph
    buffers: dict[str, Any]  # every bound I/O tensor by name
    copied: list[str] = field(default_factory=list)  # inputs copied into static buffers per replay


class GraphedEngine:
    """A TrtEngine replayed from CUDA graphs, one per input shapes + by-address input set.

    Device tensors that are not this engine's own outputs (the page pool, prefix K/V) are bound
    by address and key the capture; host arrays and carried outputs (x_next -> x_t) are copied
    into the capture's static input buffers before each replay. Outputs are the capture's static
    buffers: valid until the next `run`.
    """

    def __init__(self, engine: TrtEngine) -> None:
        self.engine = engine
        self.name, self.inputs, self.outputs = engine.name, engine.inputs, engine.outputs
        self.aliases = engine.aliases
        self.device = "cuda"
        self._captures: dict[tuple, _Capture] = {}

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        capture = self._captures.get(self._key(env)) or self._capture(env)
        with torch.cuda.stream(self.engine.stream):
            for name in capture.copied:
                spec = next(s for s in self.inputs if s.name == name)
                capture.buffers[name].copy_(as_tensor(env[name], spec.dtype), non_blocking=True)
            capture.graph.replay()
        self.engine.stream.synchronize()
        return {spec.name: capture.buffers[spec.name] for spec in self.outputs}

    def _by_address(self, name: str, value: Any) -> bool:
        if name in self.aliases.values():
            return True
        own = {id(c.buffers[s.name]) for c in self._captures.values() for s in self.outputs}
        return getattr(value, "is_cuda", False) and id(value) not in own

    def _key(self, env: Mapping[str, Any]) -> tuple:
        key = []
        for spec in self.inputs:
            value = env[spec.name]
            address = value.data_ptr() if self._by_address(spec.name, value) else None
            key.append((spec.name, tuple(value.shape), address))
        return tuple(key)

    def _capture(self, env: Mapping[str, Any]) -> _Capture:
        """Warm up once (TensorRT must enqueue before capture), then capture one enqueue."""
        import torch

        key = self._key(env)
        static, copied = {}, []
        for spec in self.inputs:
            value = to_device(env[spec.name], spec.dtype)
            by_address = self._by_address(spec.name, env[spec.name])
            static[spec.name] = value if by_address else value.clone()
            copied += [] if by_address else [spec.name]
        buffers = self.engine.bind(static)
        self.engine.enqueue()
        self.engine.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.engine.stream):
            self.engine.enqueue()
        self._captures[key] = _Capture(graph, buffers, copied)
        return self._captures[key]


# ---------------------------------------------------------------- values


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32",
                 "bool": "bool"}  # fmt: skip


def torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, _TORCH_DTYPES[dtype])


def as_tensor(value: Any, dtype: str) -> Any:
    """`value` (numpy array or torch tensor) as a torch tensor of `dtype`, where it already lives."""
    import numpy as np
    import torch

    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    if tensor.dtype != torch_dtype(dtype):
        raise WalkforgeError(f"expected {dtype}, got {tensor.dtype}")
    return tensor


def to_device(value: Any, dtype: str) -> Any:
    """A contiguous CUDA tensor of `value`; CUDA tensors pass through uncopied."""
    return as_tensor(value, dtype).to("cuda", non_blocking=True).contiguous()
