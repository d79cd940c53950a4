"""ONNX passes over walkforge's custom-op nodes: attach each op's function body so onnxruntime can
run the node, and carry the page pool as fp8 bytes (docs/design.md, "Custom ops" and "KV cache").

The ops themselves (schema, body, kernels) live in `walkforge.plugins`, one module per op; these
passes find them through `plugins.OPS` and bind a node's pool by its schema's formal names.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from types import ModuleType

import onnx

from walkforge import plugins
from walkforge.plugins.constants import DOMAIN, DOMAIN_VERSION, FP8_POOL_DTYPE, POOL_IN, POOL_OUT

logger = logging.getLogger(__name__)

MIN_OPSET = 18
"""Lowest standard opset the function bodies are valid for."""
MIN_OPSET_FP8 = 19
"""Lowest standard opset of the bodies with the fp8 pool codec (saturating Cast to FLOAT8E4M3FN)."""
_FLOAT, _FP8, _BYTES = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.UINT8


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


def _pool_names(node: onnx.NodeProto, ops: dict[str, ModuleType]) -> list[str]:
    """Values a walkforge node binds to its schema's formal input POOL_IN or output POOL_OUT."""
    if node.domain != DOMAIN or node.op_type not in ops:
        return []
    schema = ops[node.op_type].SCHEMA
    inputs = zip((p.name for p in schema.inputs), node.input, strict=False)  # optional inputs may be left off
    outputs = zip((p.name for p in schema.outputs), node.output, strict=False)
    bound = [*inputs, *outputs]
    return [value for formal, value in bound if formal in (POOL_IN, POOL_OUT) and value]


def _pool_values(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs, outputs and value infos that hold a page pool (what the walkforge ops read/write)."""
    ops = plugins.OPS
    names = {name for node in _nodes(model.graph) for name in _pool_names(node, ops)}
    graph = model.graph
    return [v for v in (*graph.input, *graph.output, *graph.value_info) if v.name in names]


def _retype_pool(model: onnx.ModelProto, types: tuple[int, ...]) -> list[str]:
    """Give every pool value of element type in `types` the type UINT8; return their names."""
    retyped = []
    for value in _pool_values(model):
        if value.type.tensor_type.elem_type in types:
            value.type.tensor_type.elem_type = _BYTES
            retyped.append(value.name)
    return retyped


def pool_is_fp8(model: onnx.ModelProto) -> bool:
    """Whether the model's page pool is fp8 (FLOAT8E4M3FN, or UINT8 carrying its bytes)."""
    return any(v.type.tensor_type.elem_type in (_FP8, _BYTES) for v in _pool_values(model))


def fp8_kv_pool(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Make the model's float32 page pool an fp8 pool; modifies and returns `model`.

    onnxruntime's Gather, ScatterND, Concat (and every other indexing op: the ONNX schemas leave
    float8 out) reject FLOAT8E4M3FN tensors, and ONNX has no bitcast, so the pool's graph inputs
    and outputs become UINT8 holding the E4M3 bytes (1 byte per element, written in place), and
    the walkforge function bodies are re-attached with the fp8 pool codec, which reads `kv_scales`.
    Returns {"kv_pool_fp8": number of pool values retyped}.
    """
    retyped = _retype_pool(model, (_FLOAT, _FP8))
    kept = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(kept)
    model, _ = attach_functions(model)
    logger.info("fp8 KV pool: %d pool value(s) now carry E4M3 bytes: %s", len(retyped), retyped)
    return model, {"kv_pool_fp8": len(retyped)}


def attach_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Attach the function body of every walkforge op that `model` uses; modifies and returns `model`.

    Bodies use the model's own standard opset (>= MIN_OPSET) and `walkforge` v1 is imported.
    A model whose pool is fp8 gets the bodies with the fp8 pool codec (opset >= MIN_OPSET_FP8; see
    `plugins.pool_codec`); a FLOAT8E4M3FN pool (traced from a float8 torch pool) is retyped to its
    UINT8 bytes first (see `fp8_kv_pool`).
    Returns counts of nodes per op, e.g. {"KVCacheWrite": 1, "PagedAttention": 18}. Functions
    already present are kept (the pass is idempotent).
    """
    from walkforge.plugins.pool_codec import function_proto

    opset = _default_opset(model)
    _retype_pool(model, (_FP8,))
    fp8 = pool_is_fp8(model)
    need = MIN_OPSET_FP8 if fp8 else MIN_OPSET
    if opset < need:
        raise ValueError(f"walkforge function bodies need opset >= {need}, model has {opset}")
    counts = Counter(node.op_type for node in _nodes(model.graph) if node.domain == DOMAIN)
    ops = plugins.OPS
    unknown = sorted(set(counts) - set(ops))
    if unknown:
        raise ValueError(f"unknown walkforge ops in model: {unknown}; known: {sorted(ops)}")
    present = {(f.domain, f.name) for f in model.functions}
    added = [name for name in sorted(counts) if (DOMAIN, name) not in present]
    pool_dtype = FP8_POOL_DTYPE if fp8 else "float32"
    model.functions.extend(function_proto(ops[name].BODY, opset, name, pool_dtype) for name in added)
    if counts and all(entry.domain != DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    logger.info("attached %d walkforge %sfunction(s) at opset %d for %s", len(added), "fp8-pool " * fp8,
                opset, dict(counts))
    return model, dict(counts)


__all__ = ["MIN_OPSET", "MIN_OPSET_FP8", "attach_functions", "fp8_kv_pool", "pool_is_fp8"]
