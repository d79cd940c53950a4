"""walkforge custom ops: one module per op, each a complete set (see DESIGN.md, "Custom ops").

Every op is a torch.library op `walkforge::<snake>` with an eager reference and fake impl, an
ONNX schema `walkforge.<Name>` v1, a translation for `torch.onnx.export(custom_translation_table=...)`
emitting one bare node, an ONNX function body of standard ops (attached after export by
`attach_functions`, so onnxruntime can run the node) and a Triton kernel.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from collections.abc import Iterator
from types import ModuleType

import onnx

from walkforge.plugins.constants import DOMAIN, DOMAIN_VERSION, PAGE_SIZE

logger = logging.getLogger(__name__)

_OP_MODULES = {
    "KVCacheWrite": "walkforge.plugins.kv_cache_write",
    "PagedAttention": "walkforge.plugins.paged_attention",
}


def __getattr__(name: str):
    """`OPS` (ONNX op name -> op module) is built on first use: the op modules import torch and
    Triton, which users of `walkforge.plugins.constants` (the runtime) should not pay for."""
    if name == "OPS":
        return _ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ops() -> dict[str, ModuleType]:
    """ONNX op name -> op module (TORCH_OP, translate, FUNCTION, the eager op, the Triton launcher)."""
    return {name: importlib.import_module(module) for name, module in _OP_MODULES.items()}


MIN_OPSET = 18
"""Lowest standard opset the function bodies are valid for."""


def translation_table() -> dict:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)`: torch op -> translation."""
    return {module.TORCH_OP: module.translate for module in _ops().values()}


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph`, subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _nodes(sub)


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("model imports no standard ONNX opset")


def attach_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Attach the function body of every walkforge op that `model` uses; modifies and returns `model`.

    Bodies use the model's own standard opset (>= MIN_OPSET) and `walkforge` v1 is imported.
    Returns counts of nodes per op, e.g. {"KVCacheWrite": 1, "PagedAttention": 18}. Functions
    already present are kept (the pass is idempotent).
    """
    from walkforge.plugins._common import function_proto

    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise ValueError(f"walkforge function bodies need opset >= {MIN_OPSET}, model has {opset}")
    counts = Counter(node.op_type for node in _nodes(model.graph) if node.domain == DOMAIN)
    unknown = sorted(set(counts) - set(_OP_MODULES))
    if unknown:
        raise ValueError(f"unknown walkforge ops in model: {unknown}; known: {sorted(_OP_MODULES)}")
    present = {(f.domain, f.name) for f in model.functions}
    added = [name for name in sorted(counts) if (DOMAIN, name) not in present]
    ops = _ops()
    model.functions.extend(function_proto(ops[name].FUNCTION, opset) for name in added)
    if counts and all(entry.domain != DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    logger.info("attached %d walkforge function(s) at opset %d for %s", len(added), opset, dict(counts))
    return model, dict(counts)


__all__ = ["MIN_OPSET", "OPS", "PAGE_SIZE", "attach_functions", "translation_table"]
