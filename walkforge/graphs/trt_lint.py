"""TensorRT-readiness lint: what TensorRT's ONNX parser will refuse in a walk, found without TensorRT.

Checks (table: graphs.trt_ops, TensorRT 10.15's operators.md):
- the standard opset is within `OPSET_RANGE`;
- every standard-domain node is in the support matrix, with the checkable restrictions
  (ScatterND reduction, TopK sorted, LayerNormalization/MaxPool extra outputs, Resize modes,
  Constant string values, Q/DQ zero points);
- every other node is a walkforge plugin: domain `walkforge`, a STRING `plugin_namespace` equal
  to "walkforge", attributes of plugin-passable types only, `aot=1` (AOT implementation), and an
  op_type that is not a standard ONNX op name (the parser matches built-ins by op_type and
  ignores the domain);
- model-local functions exist only for walkforge ops (the parser inlines functions by op_type);
- FP8 and INT8 Q/DQ: zero points absent or all zero, FLOAT8E4M3FN or INT8 (INT4 is
  TensorRT's but not a walkforge precision: a warning); a DequantizeLinear feeds
  MatMul/Gemm/Conv directly or through a Transpose of a weight, otherwise TensorRT runs it
  unfused (a warning).

Findings are values; `lint` never raises for a bad graph.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from walkforge.artifacts.manifest import Manifest, as_manifest
from walkforge.graphs import trt_ops
from walkforge.plugins.constants import DOMAIN, PLUGIN_NAMESPACE

ERROR, WARNING = "error", "warning"
STANDARD_DOMAINS = ("", "ai.onnx")
INT32_MAX = 2**31 - 1
FP8 = TensorProto.FLOAT8E4M3FN
QDQ_TYPES_OK = {FP8, TensorProto.INT8, TensorProto.INT4}
WALKFORGE_QDQ_TYPES = {FP8, TensorProto.INT8}  # --precision fp8 (Hopper/Ada) and int8 (Orin, Ampere)
IO_TYPES_REFUSED = {TensorProto.STRING, TensorProto.INT16, TensorProto.UINT16, TensorProto.UINT32,
                    TensorProto.UINT64, TensorProto.COMPLEX64, TensorProto.COMPLEX128}  # fmt: skip


@dataclass(frozen=True)
class Finding:
    """One problem TensorRT's parser or builder would have with a walk."""

    severity: str  # ERROR | WARNING
    walk: str
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.walk}: {self.node or '<graph>'} [{self.op}] {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "node": self.node, "op": self.op, "message": self.message}


def format_findings(findings: Iterable[Finding] | Mapping[str, Iterable[Finding]]) -> str:
    """One line per finding (errors first), for the CLI and logs."""
    if isinstance(findings, Mapping):
        findings = [f for walk in findings.values() for f in walk]
    ordered = sorted(findings, key=lambda f: (f.severity != ERROR, f.walk))
    return "\n".join(str(f) for f in ordered)


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


def summary(by_walk: Mapping[str, list[Finding]]) -> dict[str, Any]:
    """Manifest form: {"table": "TensorRT 10.15", "walks": {walk: {"errors", "warnings", "findings"}}}."""
    walks = {walk: {"errors": len(errors(fs)), "warnings": len(fs) - len(errors(fs)),
                    "findings": [f.to_json() for f in fs]} for walk, fs in by_walk.items()}  # fmt: skip
    return {"table": f"TensorRT {trt_ops.TABLE_VERSION}", "opsets": list(trt_ops.OPSET_RANGE), "walks": walks}


def lint(model: onnx.ModelProto, walk: str, base_dir: Path | str | None = None) -> list[Finding]:
    """Every finding for one walk's ONNX model. Weights need not be loaded: the few constants
    the checks read (zero points) come from external data under `base_dir` when stored there."""
    graph = _Graph(model.graph, base_dir)
    found = _check_opset(model, walk)
    found += _check_io_types(model.graph, walk)
    found += _check_functions(model, walk)
    for node in _nodes(model.graph):
        found += _check_node(node, graph, walk)
    for function in model.functions:
        if function.domain == DOMAIN:
            found += _check_function_body(function, walk)
    return found


def lint_bundle(root: Path | str, manifest: Manifest | Mapping[str, Any]) -> dict[str, list[Finding]]:
    """Lint every walk of a bundle (its ONNX files under `root`), by walk name."""
    return {name: lint(onnx.load(str(Path(root) / walk.onnx), load_external_data=False), name,
                       (Path(root) / walk.onnx).parent)
            for name, walk in as_manifest(manifest).walks.items()}  # fmt: skip


# ---------------------------------------------------------------- graph helpers


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Nodes of `graph` and of every subgraph (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == AttributeProto.GRAPH else attr.graphs:
                yield from _nodes(sub)


class _Graph:
    """Constant values and consumers of the top-level graph, for Q/DQ checks."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path | str | None = None) -> None:
        self.base_dir = str(base_dir) if base_dir is not None else ""
        self.constants: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.outputs = {o.name for o in graph.output}
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
            for name in node.output:
                self.producer[name] = node
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = value

    def is_constant(self, name: str) -> bool:
        return name in self.constants


def _attr(node: onnx.NodeProto | onnx.FunctionProto, name: str) -> AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def _finding(severity: str, walk: str, node: onnx.NodeProto | None, message: str) -> Finding:
    if node is None:
        return Finding(severity, walk, "", "", message)
    op = node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"
    return Finding(severity, walk, node.name, op, message)


# ---------------------------------------------------------------- model-level checks


def _check_opset(model: onnx.ModelProto, walk: str) -> list[Finding]:
    low, high = trt_ops.OPSET_RANGE
    versions = [o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS]
    if not versions:
        return [_finding(ERROR, walk, None, "model imports no standard ONNX opset")]
    if not low <= versions[0] <= high:
        return [_finding(ERROR, walk, None, f"opset {versions[0]} is outside TensorRT "
                         f"{trt_ops.TABLE_VERSION}'s supported range {low}..{high}")]
    return []


def _check_io_types(graph: onnx.GraphProto, walk: str) -> list[Finding]:
    found = []
    for value in [*graph.input, *graph.output]:
        elem = value.type.tensor_type.elem_type
        name = TensorProto.DataType.Name(elem)
        if elem in IO_TYPES_REFUSED:
            found.append(_finding(ERROR, walk, None, f"graph I/O '{value.name}' has type {name}, "
                                  "which TensorRT does not support"))
        elif elem == TensorProto.DOUBLE:
            found.append(_finding(WARNING, walk, None, f"graph I/O '{value.name}' is DOUBLE; "
                                  "TensorRT casts it to FLOAT"))
    return found


def _check_functions(model: onnx.ModelProto, walk: str) -> list[Finding]:
    found = []
    for function in model.functions:
        if function.domain != DOMAIN:
            found.append(_finding(ERROR, walk, None, f"model-local function {function.domain}::"
                                  f"{function.name}: only walkforge ops may carry function bodies "
                                  "(TensorRT inlines functions by op_type, ignoring the domain)"))
    return found


def _check_function_body(function: onnx.FunctionProto, walk: str) -> list[Finding]:
    """A walkforge body is TensorRT's fallback when the plugin is not registered: warn only."""
    found = []
    for node in function.node:
        if node.domain in STANDARD_DOMAINS and node.op_type not in trt_ops.SUPPORTED:
            found.append(_finding(WARNING, walk, node, f"used by the {function.name} function body, "
                                  "TensorRT's fallback when the plugin is not registered; "
                                  "the parser cannot import it"))
    return found


# ---------------------------------------------------------------- node checks


def _check_node(node: onnx.NodeProto, graph: _Graph, walk: str) -> list[Finding]:
    if node.domain in STANDARD_DOMAINS:
        return _check_standard(node, graph, walk)
    if node.domain == DOMAIN:
        return _check_plugin(node, walk)
    return [_finding(ERROR, walk, node, f"custom domain '{node.domain}' is not a walkforge plugin; "
                     "TensorRT has no importer for it")]


def _check_standard(node: onnx.NodeProto, graph: _Graph, walk: str) -> list[Finding]:
    op = node.op_type
    if op in trt_ops.UNSUPPORTED:
        return [_finding(ERROR, walk, node, f"listed as unsupported in TensorRT "
                         f"{trt_ops.TABLE_VERSION}'s ONNX operator table")]
    if op not in trt_ops.SUPPORTED:
        return [_finding(ERROR, walk, node, f"not in TensorRT {trt_ops.TABLE_VERSION}'s ONNX operator table")]
    found = []
    if op in trt_ops.SINCE:
        found.append(_finding(WARNING, walk, node, f"needs TensorRT >= {trt_ops.SINCE[op]} "
                              f"(walkforge supports >= {trt_ops.MIN_TRT})"))
    check = _RESTRICTION_CHECKS.get(op)
    if check is not None:
        found += [_finding(sev, walk, node, msg) for sev, msg in check(node, graph)]
    return found


def _check_plugin(node: onnx.NodeProto, walk: str) -> list[Finding]:
    def error(message: str) -> Finding:
        return _finding(ERROR, walk, node, message)

    found = []
    if onnx.defs.has(node.op_type, ""):
        found.append(error(f"custom op named like the standard ONNX op {node.op_type}: TensorRT's "
                           "parser matches built-ins by op_type and would ignore the domain"))
    namespace = _attr(node, "plugin_namespace")
    if namespace is None:
        found.append(error("walkforge plugin node has no `plugin_namespace` attribute; TensorRT "
                           "would not look for the walkforge plugin"))
    elif namespace.type != AttributeProto.STRING:
        found.append(error(f"`plugin_namespace` is {AttributeProto.AttributeType.Name(namespace.type)}, "
                           "must be STRING"))
    elif namespace.s.decode() != PLUGIN_NAMESPACE:
        found.append(error(f"`plugin_namespace` is '{namespace.s.decode()}', walkforge plugins are "
                           f"registered under '{PLUGIN_NAMESPACE}'"))
    for attr in node.attribute:
        kind = AttributeProto.AttributeType.Name(attr.type)
        if kind not in trt_ops.PLUGIN_ATTRIBUTE_TYPES:
            found.append(error(f"attribute '{attr.name}' is {kind}; TensorRT plugins take only "
                               f"{', '.join(sorted(trt_ops.PLUGIN_ATTRIBUTE_TYPES))}"))
        elif kind == "INT" and abs(attr.i) > INT32_MAX or kind == "INTS" and any(
                abs(i) > INT32_MAX for i in attr.ints):  # fmt: skip
            found.append(error(f"attribute '{attr.name}' exceeds int32; plugins receive INT as int32"))
    aot = _attr(node, "aot")
    if aot is None or aot.type != AttributeProto.INT or aot.i != 1:
        found.append(_finding(WARNING, walk, node, "no `aot=1` attribute: TensorRT would use a JIT "
                              "implementation, and walkforge registers only the AOT one"))
    return found


# ---------------------------------------------------------------- restrictions


def _zero_point(node: onnx.NodeProto, graph: _Graph) -> list[tuple[str, str]]:
    if len(node.input) < 3 or not node.input[2]:
        return []
    name = node.input[2]
    if not graph.is_constant(name):
        return [(ERROR, f"zero point '{name}' is not a constant; TensorRT needs it to be zero")]
    tensor = graph.constants[name]
    found = []
    if tensor.data_type not in QDQ_TYPES_OK:
        kind = TensorProto.DataType.Name(tensor.data_type)
        found.append((ERROR, f"quantized type {kind} is not one TensorRT supports (FP8 E4M3FN, INT8, INT4)"))
    elif tensor.data_type not in WALKFORGE_QDQ_TYPES:
        kind = TensorProto.DataType.Name(tensor.data_type)
        found.append((WARNING, f"quantized type {kind}; walkforge's precisions are FLOAT8E4M3FN and INT8"))
    try:
        values = numpy_helper.to_array(tensor, graph.base_dir).astype(np.float32)
    except (ValueError, TypeError):  # a type numpy_helper cannot convert: reported above
        return found
    if np.any(values != 0):
        found.append((ERROR, f"zero point '{name}' is nonzero; TensorRT supports only symmetric "
                      "quantization (zero point 0)"))
    return found


def _check_quantize(node: onnx.NodeProto, graph: _Graph) -> list[tuple[str, str]]:
    found = _zero_point(node, graph)
    consumers = graph.consumers.get(node.output[0], [])
    if any(c.op_type != "DequantizeLinear" for c in consumers) or not consumers:
        found.append((WARNING, "QuantizeLinear does not feed a DequantizeLinear; TensorRT fuses "
                      "only Q -> DQ pairs in front of MatMul/Gemm/Conv"))
    return found


def _check_dequantize(node: onnx.NodeProto, graph: _Graph) -> list[tuple[str, str]]:
    found = _zero_point(node, graph)
    if not _feeds_fusing_op(node, graph):
        found.append((WARNING, "DequantizeLinear does not feed MatMul/Gemm/Conv (directly or "
                      "through a Transpose of a weight); TensorRT will run it unfused"))
    return found


def _feeds_fusing_op(node: onnx.NodeProto, graph: _Graph) -> bool:
    out = node.output[0]
    consumers = graph.consumers.get(out, [])
    if not consumers or out in graph.outputs:
        return False
    weight = graph.is_constant(node.input[0]) or _quantized_constant(node.input[0], graph)
    for consumer in consumers:
        if consumer.op_type in trt_ops.QDQ_FUSING_CONSUMERS:
            continue
        if consumer.op_type == "Transpose" and weight:
            after = graph.consumers.get(consumer.output[0], [])
            if after and all(c.op_type in trt_ops.QDQ_FUSING_CONSUMERS for c in after):
                continue
        return False
    return True


def _quantized_constant(name: str, graph: _Graph) -> bool:
    """True when `name` is the output of a QuantizeLinear of a constant (a weight Q/DQ pair)."""
    node = graph.producer.get(name)
    return node is not None and node.op_type == "QuantizeLinear" and graph.is_constant(node.input[0])


def _check_scatter_nd(node: onnx.NodeProto, graph: _Graph) -> list[tuple[str, str]]:
    reduction = _attr(node, "reduction")
    if reduction is not None and reduction.s.decode() != "none":
        return [(ERROR, f"ScatterND reduction '{reduction.s.decode()}' is not supported (only 'none')")]
    return []


def _check_topk(node: onnx.NodeProto, graph: _Graph) -> list[tuple[str, str]]:
    sorted_ = _attr(node, "sorted")
    return [(ERROR, "TopK with sorted=0 is not supported")] if sorted_ is not None and sorted_.i == 0 else []


def _check_first_output_only(node: onnx.NodeProto, graph: _Graph) -> list[tuple[str, str]]:
    extra = [o for o in node.output[1:] if o]
    return [(ERROR, f"only the first output is supported; also produces {', '.join(extra)}")] if extra else []


def _check_resize(node: onnx.NodeProto, graph: _Graph) -> list[tuple[str, str]]:
    found = []
    mode = _attr(node, "mode")
    if mode is not None and mode.s.decode() not in trt_ops.RESIZE_MODES:
        found.append((ERROR, f"Resize mode '{mode.s.decode()}' is not supported (nearest, linear)"))
    coord = _attr(node, "coordinate_transformation_mode")
    if coord is not None and coord.s.decode() not in trt_ops.RESIZE_COORDINATE_MODES:
        found.append((ERROR, f"Resize coordinate_transformation_mode '{coord.s.decode()}' is not supported"))
    antialias = _attr(node, "antialias")
    if antialias is not None and antialias.i:
        found.append((ERROR, "Resize antialiasing is not supported"))
    return found


def _check_constant(node: onnx.NodeProto, graph: _Graph) -> list[tuple[str, str]]:
    bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
    return [(ERROR, f"Constant attribute '{bad[0]}' is not supported")] if bad else []


_RESTRICTION_CHECKS = {
    "QuantizeLinear": _check_quantize,
    "DequantizeLinear": _check_dequantize,
    "ScatterND": _check_scatter_nd,
    "TopK": _check_topk,
    "LayerNormalization": _check_first_output_only,
    "MaxPool": _check_first_output_only,
    "Resize": _check_resize,
    "Constant": _check_constant,
}
