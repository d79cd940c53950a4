"""One deserialised TensorRT plan per walk; values are CUDA torch tensors bound by address."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError
from walkforge.runtimes.engine import Contract
from walkforge.runtimes.values import to_torch, torch_dtype

_RUNTIME: Any = None


def _runtime() -> Any:
    global _RUNTIME
    if _RUNTIME is None:
        import tensorrt as trt

        from walkforge.runtimes.backends.trt import require

        require()
        _RUNTIME = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    return _RUNTIME


class TrtEngine:
    """Runs one walk's TensorRT plan; `forward` (what a CUDA graph captures) enqueues on the
    current stream."""

    device = "cuda"

    def __init__(self, name: str, path: Path, contract: Contract) -> None:
        from walkforge.runtimes.backends.trt import REBUILD_HINT

        self.name = name
        self.inputs, self.outputs, self.aliases = contract.inputs, contract.outputs, contract.aliases
        self.engine = _runtime().deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise WalkforgeError(f"walk '{name}': TensorRT cannot deserialise {Path(path).name}; "
                                 f"{REBUILD_HINT}")
        self.context = self.engine.create_execution_context()

    def forward(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Bind the device tensors `args` by address (aliased outputs at their input's address,
        other outputs allocated once their shape is known) and enqueue on the current stream."""
        import torch

        bound = dict(args)
        for spec in self.inputs:
            self.context.set_input_shape(spec.name, tuple(bound[spec.name].shape))
            self.context.set_tensor_address(spec.name, bound[spec.name].data_ptr())
        for spec in self.outputs:
            if spec.name in self.aliases:
                bound[spec.name] = bound[self.aliases[spec.name]]
            else:
                shape = tuple(self.context.get_tensor_shape(spec.name))
                bound[spec.name] = torch.empty(shape, dtype=torch_dtype(spec.dtype), device="cuda")
            self.context.set_tensor_address(spec.name, bound[spec.name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise WalkforgeError(f"walk '{self.name}': TensorRT failed to enqueue the engine")
        return {spec.name: bound[spec.name] for spec in self.outputs}

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        """Inputs from `env` by name (moved to the GPU where they are not), run, outputs by name."""
        import torch

        args = {s.name: to_torch(env[s.name], s.dtype, "cuda", s.name) for s in self.inputs}
        outputs = self.forward(args)
        torch.cuda.current_stream().synchronize()
        return outputs
