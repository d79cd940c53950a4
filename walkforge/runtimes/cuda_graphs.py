"""One bounded CUDA-graph capture helper for the GPU backends (torch-cuda, trt).

`GraphedEngine` replays a loop body (pi0's denoise) from CUDA graphs. The wrapped engine has
`forward(static) -> outputs`, which launches its work on the current CUDA stream reading the
device tensors `static` by name. One graph is kept per key: the input shapes plus the address of
every input read by address (`resident`: buffers that outlive a call, the page pool); every
other input is copied into the capture's static buffer before each replay. At most
`MAX_CAPTURES` graphs are kept (the oldest is dropped). Outputs are the capture's static
buffers, valid until the next `run`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from walkforge.runtimes.values import shape_of, to_torch

log = logging.getLogger(__name__)

WARMUP_RUNS = 2  # eager runs before a capture: Triton JIT, cuBLAS workspaces, TensorRT's first enqueue
MAX_CAPTURES = 8  # graphs kept per engine (batch size x block-table width x pool address)


@dataclass
class _Capture:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, Any]  # static input tensors (resident ones by address)
    outputs: dict[str, Any]  # static output tensors
    copied: list[str]  # inputs copied into their static buffer before each replay


class GraphedEngine:
    """`engine` (with `forward(static)`) replayed from at most `limit` CUDA graphs (module doc)."""

    def __init__(self, engine: Any, resident: frozenset[str], limit: int = MAX_CAPTURES) -> None:
        if engine.aliases:
            raise ValueError(f"walk '{engine.name}' updates inputs in place; it cannot be graphed")
        self.engine, self.resident, self.limit = engine, resident, limit
        self.name, self.inputs, self.outputs = engine.name, engine.inputs, engine.outputs
        self.aliases: dict[str, str] = {}
        self._captures: dict[tuple, _Capture] = {}

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        key = self._key(env)
        capture = self._captures.get(key) or self._capture(key, env)
        with torch.inference_mode():
            for name in capture.copied:
                capture.inputs[name].copy_(self._tensor(name, env), non_blocking=True)
            capture.graph.replay()
        return dict(capture.outputs)

    def _key(self, env: Mapping[str, Any]) -> tuple:
        return tuple((s.name, shape_of(env[s.name]),
                      env[s.name].data_ptr() if s.name in self.resident else None) for s in self.inputs)

    def _tensor(self, name: str, env: Mapping[str, Any]) -> Any:
        spec = next(s for s in self.inputs if s.name == name)
        return to_torch(env[name], spec.dtype, "cuda", name)

    def _capture(self, key: tuple, env: Mapping[str, Any]) -> _Capture:
        """Warm up on a side stream, then capture one forward (torch.cuda.graphs' recipe)."""
        import torch

        if len(self._captures) >= self.limit:
            del self._captures[next(iter(self._captures))]
        static = {s.name: self._tensor(s.name, env) if s.name in self.resident
                  else self._tensor(s.name, env).clone() for s in self.inputs}  # fmt: skip
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.engine.forward(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self.engine.forward(static)
        copied = [s.name for s in self.inputs if s.name not in self.resident]
        self._captures[key] = _Capture(graph, static, outputs, copied)
        log.info("walk '%s': captured CUDA graph %d of at most %d", self.name, len(self._captures),
                 self.limit)
        return self._captures[key]
