"""Trace one walk to ONNX with torch's dynamo exporter, without weights in memory.

The walk's module is exported on the meta device (`optimize=False`) and saved without
initializers; its nodes name weights by their state-dict keys. The weights are then streamed
from a safetensors file into `<walk>.onnx.data` (`graphs.initializers`). So exporting a
3 B-parameter walk costs the graph, not ≈2.3× its weights. Input/output names and dynamic
axes come from the walk's TensorSpecs; custom ops are emitted as single `walkforge::<Name>`
nodes through the plugins' translation table.

The weightless graph is a function of the walk's structure alone, which the recipe builds from its
config: `export_walk(..., key=...)` keeps the last TRACED_KEPT graphs of this process by that key
(the compile pipeline's: walkforge version, recipe, config, walk), so compiling the same config
again — other weights, another precision, another folder — skips the exporter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import onnx
import torch
from safetensors.torch import save_file

from walkforge import plugins
from walkforge.graphs.initializers import attach_initializers
from walkforge.graphs.walk import GraphNode

log = logging.getLogger(__name__)
# The exporter warns once per missing torchvision op; none of our walks use torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
OPSET = 20
TRACED_KEPT = 16  # weightless graphs kept per process (tiny ones are kB, a full-size prefill a few MB)
_traced: OrderedDict[str, bytes] = OrderedDict()


def dynamic_shapes(node: GraphNode) -> dict[str, dict[int, str]]:
    return {spec.name: spec.dynamic_axes for spec in node.inputs}


def export_walk(node: GraphNode, path: Path, weights: Path | None = None, key: str | None = None
                ) -> tuple[dict[str, int], dict[str, int]]:
    """Export `node` to `path`, its weights to `<path>.data`; return (op counts, attach counts).

    `weights` is a safetensors file holding the module's state dict (the compile pipeline's
    `weights/model.safetensors`); the module may then live on the meta device. Without it the
    module's own weights are written to a temporary file first (small modules, tests). `key`
    names the walk's structure: a graph traced under the same key in this process is reused.
    """
    path = Path(path)
    if weights is None:
        with tempfile.TemporaryDirectory() as tmp:
            state = {k: v.detach().contiguous() for k, v in node.module.state_dict().items()}
            save_file(state, f"{tmp}/weights.safetensors")
            return export_walk(node, path, Path(tmp) / "weights.safetensors", key)
    traced_walk(node, path, key)
    model, counts = attach_initializers(onnx.load(str(path)), weights, f"{path}.data")
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return op_counts(model), counts


def traced_walk(node: GraphNode, path: Path, key: str | None) -> None:
    """`trace_walk`, or the graph traced under `key` earlier in this process."""
    if key is not None and key in _traced:
        _traced.move_to_end(key)
        path.write_bytes(_traced[key])
        log.info("walk '%s': graph reused (key %s)", node.name, key[:12])
        return
    trace_walk(node, path)
    if key is not None:
        _traced[key] = path.read_bytes()
        while len(_traced) > TRACED_KEPT:
            _traced.popitem(last=False)


def structure_key(*parts: object) -> str:
    """A trace key from what determines a walk's graph (JSON-able parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def trace_walk(node: GraphNode, path: Path) -> None:
    """Export `node`'s module on the meta device and save the graph without initializers."""
    args = tuple(node.example_inputs[s.name].to("meta") for s in node.inputs)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            on_meta(node.module).eval(), args, dynamo=True, optimize=False, opset_version=OPSET,
            input_names=[s.name for s in node.inputs],
            output_names=[s.name for s in node.outputs],
            dynamic_shapes=dynamic_shapes(node),
            custom_translation_table=plugins.translation_table(),
            verbose=False,
        )
    program.save(str(path), include_initializers=False)


def on_meta(module: torch.nn.Module) -> torch.nn.Module:
    """`module` itself if its weights are on the meta device, else a copy whose are (no data
    is copied: the deep copy is handed meta stand-ins for every parameter and buffer)."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.is_meta for t in tensors):
        return module
    memo = {id(t): (torch.nn.Parameter(t.to("meta"), t.requires_grad)
                    if isinstance(t, torch.nn.Parameter) else t.to("meta")) for t in tensors}
    return copy.deepcopy(module, memo)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type (custom ops as `domain::Op`), sorted by name."""
    counts = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in model.graph.node
    )
    return dict(sorted(counts.items()))
