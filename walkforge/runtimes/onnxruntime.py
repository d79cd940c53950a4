"""onnxruntime engine backend: one InferenceSession per walk, run through IOBinding.

Values passed between engines stay `OrtValue`s, so a buffer produced by one engine (a KV
cache, the page pool) is bound by reference into the next — never copied. An output listed
in the walk's `aliases` is bound to the same OrtValue as its input: the engine updates it in
place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort

from walkforge.errors import WalkforgeError
from walkforge.graphs.fp8 import ORT_DISABLED_OPTIMIZERS
from walkforge.graphs.walk import TensorSpec

Value = np.ndarray | ort.OrtValue


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """Options every walkforge session uses. `spinning=False` for in-process parity with torch."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # FP8 Q/DQ must not be fused into int8-only kernels on CPU (TOOLCHAIN.md).
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


class OrtEngine:
    """Runs one walk's ONNX on onnxruntime."""

    def __init__(self, name: str, path: Path, contract: Mapping[str, Any],
                 threads: int | None = None, spinning: bool = True,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        self.name = name
        self.inputs = [TensorSpec.from_json(s) for s in contract["inputs"]]
        self.outputs = [TensorSpec.from_json(s) for s in contract["outputs"]]
        self.aliases = dict(contract.get("aliases", {}))
        try:
            self.session = ort.InferenceSession(
                str(path), session_options(threads, spinning), providers=list(providers),
                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS),  # FP8-unsafe rewrites
            )
        except Exception as exc:  # onnxruntime raises untyped pybind errors
            raise WalkforgeError(f"walk '{name}': onnxruntime cannot load {path.name}: "
                                 f"{str(exc).splitlines()[0]}") from None
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, env: Mapping[str, Value]) -> dict[str, ort.OrtValue]:
        """Bind inputs from `env` by name, run, return outputs as OrtValues by name."""
        binding = self.session.io_binding()
        bound: dict[str, ort.OrtValue] = {}
        for spec in self.inputs:
            bound[spec.name] = to_ortvalue(env[spec.name])
            binding.bind_ortvalue_input(spec.name, bound[spec.name])
        for spec in self.outputs:
            if spec.name in self.aliases:
                binding.bind_ortvalue_output(spec.name, bound[self.aliases[spec.name]])
            else:
                binding.bind_output(spec.name, self.device)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise WalkforgeError(f"walk '{self.name}' failed in onnxruntime: "
                                 f"{str(exc).splitlines()[0]}") from None
        outputs = dict(zip((s.name for s in self.outputs), binding.get_outputs(), strict=True))
        for out, inp in self.aliases.items():
            # Written in place: hand back the caller's own buffer. The binding's OrtValue for it
            # does not keep a numpy array alive, so it could outlive (and read freed) memory.
            outputs[out] = env[inp]
        return outputs


def to_ortvalue(value: Value) -> ort.OrtValue:
    """`value` as an OrtValue; a numpy array is shared, not copied, when contiguous. A float8_e4m3fn
    array (an fp8 page pool) is bound as its uint8 view: the walks carry an fp8 pool as its bytes
    (onnxruntime cannot Gather or ScatterND float8 tensors; see `walkforge.plugins.fp8_kv_pool`)."""
    if isinstance(value, ort.OrtValue):
        return value
    return ort.OrtValue.ortvalue_from_numpy(as_ort_array(value))


def as_ort_array(value: np.ndarray) -> np.ndarray:
    """Contiguous `value`, a float8_e4m3fn array viewed as its uint8 bytes (no copy)."""
    value = np.ascontiguousarray(value)
    return value.view(np.uint8) if value.dtype == ml_dtypes.float8_e4m3fn else value


def to_numpy(value: Value) -> np.ndarray:
    return value.numpy() if isinstance(value, ort.OrtValue) else np.asarray(value)
