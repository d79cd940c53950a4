"""The walk vocabulary: what one engine computes and how the runtime chains engines.

A `GraphNode` is one walk: a torch module, its input/output `TensorSpec`s and example inputs
for tracing. Symbolic dims (strings in a shape) become dynamic axes on export and are checked
for consistency at run time. `Sequential` runs nodes in order over one name → tensor
environment (an output feeds every later input of the same name); `Loop` runs a node
`count` times, feeding `carry` outputs back as inputs. `GraphEdge` names a rename between a
producer's output and a consumer's input where the names differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from walkforge.errors import WalkforgeError

Dim = int | str
DTYPES = ("float32", "float16", "int64", "int32", "bool", "float8_e4m3fn")
"""float8_e4m3fn (an fp8 KV page pool) is ml_dtypes.float8_e4m3fn in numpy, 1 byte per element."""


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a TensorSpec dtype name."""
    if name == "float8_e4m3fn":
        return np.dtype(ml_dtypes.float8_e4m3fn)
    return np.dtype(name)


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor contract: dtype and a shape whose str entries are symbolic dims."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype {self.dtype!r} not one of {DTYPES}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))

    def check(self, value: np.ndarray, dims: dict[str, int], where: str = "") -> None:
        """Validate `value` against this spec, binding symbolic dims into `dims`.

        Raises WalkforgeError naming the tensor and what differs (rank, size, dtype, NaN/Inf).
        """
        label = f"{where}{self.name}"
        if not isinstance(value, np.ndarray):
            raise WalkforgeError(f"{label}: expected a numpy array, got {type(value).__name__}")
        if value.dtype != numpy_dtype(self.dtype):
            raise WalkforgeError(f"{label}: dtype {value.dtype}, expected {self.dtype}")
        if value.ndim != len(self.shape):
            raise WalkforgeError(
                f"{label}: rank {value.ndim} (shape {list(value.shape)}), expected rank "
                f"{len(self.shape)} {self.describe_shape()}"
            )
        for axis, (got, want) in enumerate(zip(value.shape, self.shape, strict=True)):
            if isinstance(want, int) and got != want:
                raise WalkforgeError(
                    f"{label}: axis {axis} has size {got}, expected {want} "
                    f"(shape {list(value.shape)} vs {self.describe_shape()})"
                )
            if isinstance(want, str):
                bound = dims.setdefault(want, got)
                if bound != got:
                    raise WalkforgeError(
                        f"{label}: axis {axis} ('{want}') has size {got}, but another input "
                        f"bound '{want}' = {bound}"
                    )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise WalkforgeError(f"{label}: contains NaN or Inf")

    def describe_shape(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class GraphNode:
    """One walk: a module traced to one engine.

    `module.forward` takes the inputs positionally in `inputs` order and returns the outputs
    in `outputs` order (a tensor, or a tuple for several). `example_inputs` are used for
    tracing; give every symbolic dim a size ≥ 2 there. `aliases` maps an output name to the
    input whose buffer it updates in place (the runtime binds both to one buffer).
    """

    name: str
    module: Any  # torch.nn.Module; Any keeps this module importable without torch
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example_inputs: Mapping[str, Any]
    aliases: Mapping[str, str] = field(default_factory=dict)

    def contract(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "aliases": dict(self.aliases),
        }


@dataclass(frozen=True)
class GraphEdge:
    """Feed `src`'s output `output` to `dst`'s input `input` (used where names differ)."""

    src: str
    output: str
    dst: str
    input: str

    def to_json(self) -> dict[str, str]:
        return {"src": self.src, "output": self.output, "dst": self.dst, "input": self.input}


@dataclass(frozen=True)
class Loop:
    """Run walk `body` `count` times (`count` names a run-time setting such as num_steps).

    `carry` maps an output of the body to the input it feeds on the next iteration;
    `schedule` names how the runtime derives per-step inputs (e.g. "euler": t and dt).
    `guide` (optional) names a walk run after the body in each step, only when every input it
    takes is in the environment (a flow VLA's real-time-chunking guidance: the caller's inputs
    switch it on); its one output replaces the body's carried output (the first `carry` key)
    before it is carried. Written to the manifest only when set, so older plans read as before.
    """

    body: str
    count: str
    carry: Mapping[str, str]
    schedule: str = ""
    guide: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {"loop": self.body, "count": self.count, "carry": dict(self.carry), "schedule": self.schedule}
        return out | ({"guide": self.guide} if self.guide else {})


@dataclass(frozen=True)
class Sequential:
    """A recipe's walks and the order the runtime runs them in.

    `kv_tokens`: the most KV-cache tokens one request writes into the page pool (pi0: its
    prefix); the runtime sizes block tables and the default pool from it. 0: no paged KV.
    """

    nodes: tuple[GraphNode, ...]
    steps: tuple[str | Loop, ...]
    edges: tuple[GraphEdge, ...] = ()
    kv_tokens: int = 0

    def node(self, name: str) -> GraphNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def plan(self) -> list[Any]:
        return [s.to_json() if isinstance(s, Loop) else s for s in self.steps]


def loop_bodies(plan: list) -> set[str]:
    """Walks a plan (`Sequential.plan()`, the manifest's `plan`) runs in a Loop, step after step:
    replayed from CUDA graphs by the GPU backends; their cpu sessions keep spinning between runs."""
    return {step["loop"] for step in plan if isinstance(step, dict)}
