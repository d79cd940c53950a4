"""CUDA backends: `torch-cuda` (the recipe's modules, bf16, Triton plugin kernels) and `cuda`
(the bundle's ONNX on onnxruntime-gpu). runtimes/backends.py probes and picks them.

torch-cuda
    The recipe's walk modules on the GPU with bf16 weights under bf16 autocast. Engine inputs
    and outputs keep the bundle's contract dtypes (float32), so x_t and the page pool stay
    float32 between walks. The custom ops get CUDA kernels that call the Triton launchers
    (`register_cuda_kernels`), so model code has no hardware branch. The loop body (pi0's
    denoise) is captured as a CUDA graph once per input shapes; each step copies the carried
    x_t and the small schedule inputs into the graph's static buffers and replays.

    The page pool lives on the device for the front's lifetime: the host pool the front hands
    every backend (numpy or OrtValue) is uploaded once. `kv_cache_write` is functional (a torch
    custom op may not return its input), so prefill returns an updated copy that is copied back
    into the resident pool: one device-side pool copy per call, none per denoise step, and the
    graphed denoise reads the resident pool by address.

cuda
    The bundle's ONNX on CUDAExecutionProvider. Inputs become device OrtValues, outputs are
    bound on the device, the pool is one device OrtValue bound as prefill's input and output
    (written in place), and x_t passes between denoise steps as a device OrtValue: per step only
    t, dt, state and the block table (bytes) are uploaded, and nothing returns to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import GraphNode, Sequential, TensorSpec
from walkforge.plugins import kv_cache_write as kvw
from walkforge.plugins import paged_attention as pa
from walkforge.runtimes.onnxruntime import OrtEngine, as_ort_array, to_numpy
from walkforge.runtimes.tensorrt import loop_bodies

logger = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.bfloat16
WARMUP_RUNS = 2  # eager runs before a capture: Triton JIT, cuBLAS workspaces
MAX_CAPTURES = 8  # CUDA graphs kept per engine (batch size x block-table width)
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
                 "int32": torch.int32, "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn}  # fmt: skip


# ---------------------------------------------------------------- custom-op kernels on CUDA


def _kv_cache_write_cuda(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                         positions: torch.Tensor, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """walkforge::kv_cache_write on CUDA: a copy of `pool` written by the Triton kernel.
    K/V are cast to float32 (bf16 K/V into a float32 pool; an fp8 pool quantises from float32)."""
    out = pool.clone(memory_format=torch.contiguous_format)
    return kvw.kv_cache_write_triton(out, k.float(), v.float(), block_table, positions, kv_scales)


def _paged_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor,
                          block_table: torch.Tensor, prefix_lens: torch.Tensor, suffix_mask: torch.Tensor,
                          layer: int, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """walkforge::paged_attention on CUDA: the Triton kernel in float32 over a float32 or fp8 pool,
    returned in q's dtype."""
    out = pa.paged_attention_triton(q.float(), k.float(), v.float(), pool.contiguous(), block_table,
                                    prefix_lens, suffix_mask, layer, scale, kv_scales)
    return out.to(q.dtype)


def register_cuda_kernels() -> None:
    """Dispatch torch.ops.walkforge.* on CUDA tensors to the Triton launchers (idempotent).
    CPU tensors keep the eager references."""
    kvw.kv_cache_write.register_kernel("cuda", _kv_cache_write_cuda)
    pa.paged_attention.register_kernel("cuda", _paged_attention_cuda)


# ---------------------------------------------------------------- values


def host_array(value: Any) -> np.ndarray | torch.Tensor:
    """A numpy array or torch tensor of `value` (numpy, torch, or an onnxruntime OrtValue)."""
    return value.numpy() if isinstance(value, ort.OrtValue) else value


def to_device(value: Any, spec: TensorSpec, device: str = "cuda") -> torch.Tensor:
    """`value` as a contiguous tensor of the spec's dtype on `device`; tensors there pass uncopied."""
    value = host_array(value)
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    if tensor.dtype != _TORCH_DTYPES[spec.dtype]:
        raise WalkforgeError(f"{spec.name}: expected {spec.dtype}, got {tensor.dtype}")
    return tensor.to(device, non_blocking=True).contiguous()


def shape_of(value: Any) -> tuple[int, ...]:
    """Shape of a numpy array, torch tensor or OrtValue (whose `shape` is a method)."""
    shape = value.shape() if callable(getattr(value, "shape", None)) else value.shape
    return tuple(int(d) for d in shape)


class DeviceBuffers:
    """Device copies of host buffers that outlive a call (the page pool), one per host object.

    `names` are the walk inputs that some walk updates in place (its `aliases`)."""

    def __init__(self, names: Iterable[str], device: str = "cuda") -> None:
        self.names = frozenset(names)
        self.device = device
        self._held: dict[int, tuple[Any, torch.Tensor]] = {}

    def get(self, spec: TensorSpec, value: Any) -> torch.Tensor:
        """`value` on the device: resident names by host object (uploaded once), others as given."""
        on_device = isinstance(value, torch.Tensor) and value.device.type == self.device
        if spec.name not in self.names or on_device:
            return to_device(value, spec, self.device)
        held = self._held.get(id(value))
        if held is None or held[0] is not value:  # keep `value` alive so its id stays unique
            held = self._held[id(value)] = (value, to_device(value, spec, self.device))
        return held[1]

    @staticmethod
    def store(resident: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
        """Make `resident` hold `updated` (a walk's functional output) and return it."""
        if updated.data_ptr() != resident.data_ptr():
            resident.copy_(updated)
        return resident


# ---------------------------------------------------------------- torch-cuda engines


class TorchCudaEngine:
    """One walk's module on CUDA in bf16; same interface as OrtEngine."""

    def __init__(self, node: GraphNode, buffers: DeviceBuffers) -> None:
        self.name, self.node, self.buffers = node.name, node, buffers
        self.inputs, self.outputs = list(node.inputs), list(node.outputs)
        self.aliases = dict(node.aliases)
        self.device = "cuda"

    def forward(self, args: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module on device tensors by name; outputs in their contract dtypes."""
        with torch.autocast("cuda", dtype=COMPUTE_DTYPE, cache_enabled=False):
            out = self.node.module(*(args[s.name] for s in self.inputs))
        out = out if isinstance(out, tuple) else (out,)
        return {s.name: o.to(_TORCH_DTYPES[s.dtype]) for s, o in zip(self.outputs, out, strict=True)}

    @torch.inference_mode()
    def run(self, env: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        args = {s.name: self.buffers.get(s, env[s.name]) for s in self.inputs}
        outputs = self.forward(args)
        for out, inp in self.aliases.items():  # in place, as far as the chain can tell
            outputs[out] = self.buffers.store(args[inp], outputs[out])
        return outputs


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static input buffers (resident ones by address)
    outputs: dict[str, torch.Tensor]  # static output buffers, valid until the next replay
    copied: list[str]  # inputs copied into their static buffer before each replay


class GraphedTorchEngine:
    """A TorchCudaEngine replayed from CUDA graphs, one per input shapes and resident addresses.

    For loop bodies (no aliases). Resident buffers (the page pool) are read by address; every
    other input is copied into the capture's static buffer before a replay.
    """

    def __init__(self, engine: TorchCudaEngine) -> None:
        if engine.aliases:
            raise ValueError(f"walk '{engine.name}' updates inputs in place; it cannot be graphed")
        self.engine = engine
        self.name, self.inputs, self.outputs = engine.name, engine.inputs, engine.outputs
        self.aliases: dict[str, str] = {}
        self.device = "cuda"
        self._captures: dict[tuple, _Capture] = {}

    @torch.inference_mode()
    def run(self, env: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        resident = {s.name: self.engine.buffers.get(s, env[s.name]) for s in self.inputs
                    if s.name in self.engine.buffers.names}  # fmt: skip
        key = tuple((s.name, shape_of(resident.get(s.name, env[s.name])),
                     resident[s.name].data_ptr() if s.name in resident else None) for s in self.inputs)
        capture = self._captures.get(key) or self._capture(key, env, resident)
        for name in capture.copied:
            value = host_array(env[name])
            value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            capture.inputs[name].copy_(value, non_blocking=True)
        capture.graph.replay()
        return dict(capture.outputs)

    def _capture(self, key: tuple, env: Mapping[str, Any], resident: dict[str, torch.Tensor]) -> _Capture:
        """Warm up on a side stream, then capture one forward (torch.cuda.graphs' recipe)."""
        if len(self._captures) >= MAX_CAPTURES:
            del self._captures[next(iter(self._captures))]
        static = {s.name: resident[s.name] if s.name in resident else to_device(env[s.name], s).clone()
                  for s in self.inputs}  # fmt: skip
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.engine.forward(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.engine.forward(static)
        copied = [s.name for s in self.inputs if s.name not in resident]
        self._captures[key] = _Capture(graph, static, outputs, copied)
        logger.info("walk '%s': captured CUDA graph %d for shapes %s", self.name, len(self._captures),
                    [k[1] for k in key])  # fmt: skip
        return self._captures[key]


def torch_cuda_walk_engines(walks: Sequential, cuda_graphs: bool = True) -> dict[str, Any]:
    """Engines for walks whose modules already sit on the GPU in COMPUTE_DTYPE."""
    register_cuda_kernels()
    buffers = DeviceBuffers(name for node in walks.nodes for name in node.aliases.values())
    graphed = loop_bodies(walks.plan()) if cuda_graphs else set()
    engines: dict[str, Any] = {}
    for node in walks.nodes:
        engine = TorchCudaEngine(node, buffers)
        engines[node.name] = GraphedTorchEngine(engine) if node.name in graphed else engine
    return engines


def torch_cuda_engines(bundle: Any, cuda_graphs: bool = True) -> dict[str, Any]:
    """One torch-cuda engine per walk of `bundle` (weights from the bundle, cast to bf16)."""
    from walkforge.runtimes.torch_backend import build_model

    recipe, cfg, model = build_model(bundle, "cuda", dtype=COMPUTE_DTYPE)
    return torch_cuda_walk_engines(recipe.walks(model, cfg), cuda_graphs)


# ---------------------------------------------------------------- cuda (onnxruntime-gpu) engines

CUDA_PROVIDERS = (("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider")
"""fp32 ONNX stays fp32 (no TF32 matmuls): the cuda target is compared with the fp32 reference."""


class OrtCudaEngine(OrtEngine):
    """One walk's ONNX on CUDAExecutionProvider with every value on the device.

    `resident` (shared by a bundle's engines) maps host buffers that walks update in place (the
    page pool) to their device OrtValue, uploaded once per host object.
    """

    def __init__(self, name: str, path: Path, contract: Mapping[str, Any],
                 resident: dict[int, tuple[Any, ort.OrtValue]]) -> None:
        preload = getattr(ort, "preload_dlls", None)  # CUDA / cuDNN from the nvidia-* wheels
        if preload is not None:
            preload()
        super().__init__(name, path, contract, providers=CUDA_PROVIDERS)  # type: ignore[arg-type]
        self.device = "cuda"
        providers = self.session.get_providers()
        if providers[0] != "CUDAExecutionProvider":  # onnxruntime-gpu falls back silently
            raise WalkforgeError(f"walk '{name}': onnxruntime did not start CUDAExecutionProvider (session "
                                 f"has {', '.join(providers)}); are CUDA 13 and cuDNN 9 installed?")
        self.in_place = set(self.aliases.values())
        self.resident = resident

    def on_device(self, name: str, value: Any) -> ort.OrtValue:
        if isinstance(value, ort.OrtValue) and value.device_name().lower() == "cuda":
            return value
        if name not in self.in_place:
            return ort.OrtValue.ortvalue_from_numpy(as_ort_array(to_numpy(value)), "cuda", 0)
        held = self.resident.get(id(value))
        if held is None or held[0] is not value:
            device = ort.OrtValue.ortvalue_from_numpy(as_ort_array(to_numpy(value)), "cuda", 0)
            held = self.resident[id(value)] = (value, device)
        return held[1]

    def run(self, env: Mapping[str, Any]) -> dict[str, ort.OrtValue]:
        binding = self.session.io_binding()
        bound = {s.name: self.on_device(s.name, env[s.name]) for s in self.inputs}
        for name, value in bound.items():
            binding.bind_ortvalue_input(name, value)
        for spec in self.outputs:
            if spec.name in self.aliases:
                binding.bind_ortvalue_output(spec.name, bound[self.aliases[spec.name]])
            else:
                binding.bind_output(spec.name, "cuda", 0)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises untyped pybind errors
            raise WalkforgeError(f"walk '{self.name}' failed in onnxruntime (CUDA): "
                                 f"{str(exc).splitlines()[0]}") from None
        return dict(zip((s.name for s in self.outputs), binding.get_outputs(), strict=True))


def ort_cuda_engines(bundle: Any) -> dict[str, OrtCudaEngine]:
    """One OrtCudaEngine per walk, on the bundle's ONNX (its 'cuda' target, else its 'cpu' one)."""
    targets = bundle.manifest["targets"]
    target = targets.get("cuda") or targets.get("cpu")
    if target is None:
        raise WalkforgeError("bundle has no ONNX target ('cpu') for the cuda backend to run")
    resident: dict[int, tuple[Any, ort.OrtValue]] = {}
    return {name: OrtCudaEngine(name, bundle.path(rel), bundle.walk(name), resident)
            for name, rel in target["walks"].items()}
