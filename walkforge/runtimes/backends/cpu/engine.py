"""One InferenceSession per walk, run through IOBinding (the cpu and cuda backends' engine).

Values passed between engines stay `OrtValue`s (or the caller's numpy arrays, bound without a
copy), so a buffer produced by one engine is bound by reference into the next. An output listed
in the walk's `aliases` is bound to the same OrtValue as its input: the engine updates it in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError
from walkforge.graphs.ort import require_onnxruntime, session_kwargs, session_options, varying_shapes
from walkforge.runtimes.engine import Contract
from walkforge.runtimes.values import ort_array

ort = require_onnxruntime()  # walkforge[compile] without [cpu]: one line saying what to install


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class OrtEngine:
    """Runs one walk's ONNX on onnxruntime (CPU unless `providers` say otherwise)."""

    device = "cpu"

    def __init__(self, name: str, path: Path, contract: Contract, threads: int | None = None,
                 spinning: bool = True, providers: tuple[Any, ...] = ("CPUExecutionProvider",),
                 fuse_qdq: bool = False, prepack: bool = True, int8_weight_max: float = 127,
                 spin_after_run: bool = True) -> None:
        self.name = name
        self.inputs, self.outputs, self.aliases = contract.inputs, contract.outputs, contract.aliases
        try:
            opts = session_options(threads, spinning, fuse_qdq, arena=not varying_shapes(self.inputs),
                                   prepack=prepack, int8_weight_max=int8_weight_max,
                                   spin_after_run=spin_after_run)
            self.session = ort.InferenceSession(str(path), opts,
                                                **session_kwargs(list(providers), fuse_qdq))
        except Exception as exc:  # onnxruntime raises untyped pybind errors
            raise WalkforgeError(f"walk '{name}': onnxruntime cannot load {Path(path).name}: "
                                 f"{first_line(exc)}") from None

    def bind_input(self, name: str, value: Any) -> ort.OrtValue:
        """`value` as an OrtValue where this engine runs; a contiguous numpy array is shared."""
        if isinstance(value, ort.OrtValue):
            return value
        return ort.OrtValue.ortvalue_from_numpy(ort_array(value))

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        """Bind inputs from `env` by name, run, return outputs as OrtValues by name."""
        binding = self.session.io_binding()
        bound = {s.name: self.bind_input(s.name, env[s.name]) for s in self.inputs}
        for name, value in bound.items():
            binding.bind_ortvalue_input(name, value)
        for spec in self.outputs:
            if spec.name in self.aliases:
                binding.bind_ortvalue_output(spec.name, bound[self.aliases[spec.name]])
            else:
                binding.bind_output(spec.name, self.device)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise WalkforgeError(f"walk '{self.name}' failed in onnxruntime ({self.device}): "
                                 f"{first_line(exc)}") from None
        outputs = dict(zip((s.name for s in self.outputs), binding.get_outputs(), strict=True))
        for out, inp in self.aliases.items():
            # Written in place: hand back the caller's own buffer. The binding's OrtValue for a
            # numpy input does not keep the array alive, so it could outlive (and read freed) memory.
            outputs[out] = env[inp]
        return outputs
