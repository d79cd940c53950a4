"""The bf16 pass: GEMM and conv math in bfloat16, everything else left in float32.

For every MatMul/Gemm/Conv of the main graph with float32 operands the pass rewrites

    x (fp32) ─────────┐                      x → Cast(bf16) ─┐
    W (fp32 init) ── MatMul → y     into     W (bf16 init) ── MatMul → y16 → Cast(fp32) → y

so weights are stored once in bf16 (half the bytes) and the GEMM runs bf16 with fp32
accumulation, which is what a strongly typed TensorRT build and the CUDA target take from the
tensor types. What precision needs stays float32 because the pass never touches it: norm statistics
(ReduceMean/Pow/Sqrt), Softmax, the Euler update (Add/Mul of x_t and v_t), the sinusoidal time
embedding, the walk inputs and outputs, and the walkforge custom ops (attention over the page pool
keeps its fp32 pool and body). An initializer read by anything besides GEMMs (a tied embedding
table also read by a Gather) stays fp32 and gets a Cast instead. Like the Q/DQ pass
(graphs/qdq.py), nodes inside model-local functions are not touched.

`emulate_bf16` is the CPU check of a bf16 graph: onnxruntime's CPU provider has no bf16 MatMul,
so every bf16 GEMM becomes Cast(fp32) → the fp32 GEMM → Cast(bf16). Weights and GEMM inputs keep
their bf16 values exactly, products accumulate in fp32 (as on tensor cores) and each result is
rounded to bf16 as the real kernel's output is: accuracy emulation, no speed.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from walkforge.graphs.qdq import _is_2d_transpose, _Names, read_tensor

BF16, FLOAT = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
BF16_OPS = ("MatMul", "Gemm", "Conv")


def cast_bf16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Make every float32 GEMM/conv of the main graph bf16 where the model's opset allows it (module
    doc); returns (model, counts: gemms, weights_bf16, casts, kept_fp32_opset)."""
    graph = model.graph
    fresh = _Names(model.graph)
    floats = _float_tensors(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    candidates = [n for n in graph.node if n.op_type in BF16_OPS and n.domain in ("", "ai.onnx")
                  and all(i in floats for i in n.input if i)]  # fmt: skip
    gemms = [n for n in candidates if allows_bf16(n.op_type, opset)]
    to_bf16 = _gemm_only_initializers(graph, gemms)
    for tensor in graph.initializer:
        if tensor.name in to_bf16:
            tensor.CopyFrom(bf16_tensor(read_tensor(tensor), tensor.name))
    casts: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    counts = Counter(
        gemms=len(gemms), weights_bf16=len(to_bf16), kept_fp32_opset=len(candidates) - len(gemms)
    )
    chosen = {id(n) for n in gemms}
    transposes = {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in to_bf16}
    for node in graph.node:
        if id(node) not in chosen:
            nodes.append(node)
            continue
        for k, name in enumerate(node.input):
            if name and name not in to_bf16 and name not in transposes:
                node.input[k] = _cast_once(fresh, name, BF16, casts, nodes, counts)
        out = node.output[0]
        node.output[0] = fresh(f"{out}_bf16")
        nodes += [
            node,
            helper.make_node("Cast", [node.output[0]], [out], to=FLOAT, name=fresh(f"{out}_to_fp32")),
        ]
        counts["casts"] += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return model, dict(counts)


def emulate_bf16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Rewrite each bf16 GEMM/conv (bf16 inputs) as fp32 math between Casts, for CPU providers
    without bf16 kernels; values and roundings are those of the bf16 graph (module doc)."""
    graph = model.graph
    fresh = _Names(model.graph)
    bf16 = {t.name for t in graph.initializer if t.data_type == BF16}
    bf16 |= {n.output[0] for n in graph.node if n.op_type == "Cast" and _to(n) == BF16}
    nodes: list[onnx.NodeProto] = []
    counts = Counter()
    for node in graph.node:
        if node.op_type not in (*BF16_OPS, "Transpose") or not any(i in bf16 for i in node.input):
            nodes.append(node)
            continue
        casts: dict[str, str] = {}
        for k, name in enumerate(node.input):
            if name in bf16:
                node.input[k] = _cast_once(fresh, name, FLOAT, casts, nodes, counts)
        if node.op_type == "Transpose":  # a weight's layout change: exact in fp32, nothing to round
            nodes.append(node)
            continue
        out = node.output[0]
        node.output[0] = fresh(f"{out}_fp32")
        nodes += [
            node,
            helper.make_node("Cast", [node.output[0]], [out], to=BF16, name=fresh(f"{out}_round")),
        ]
        counts["emulated"] += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return model, dict(counts)


def allows_bf16(op_type: str, opset: int) -> bool:
    """Whether standard op `op_type` at `opset` takes bfloat16 (Conv only from opset 22; such a
    node keeps fp32: in pi0 that is the one patch-embedding conv)."""
    schema = onnx.defs.get_schema(op_type, opset)
    return "tensor(bfloat16)" in schema.type_constraints[0].allowed_type_strs


def bf16_tensor(value: np.ndarray, name: str) -> onnx.TensorProto:
    """A BFLOAT16 initializer holding `value` rounded to nearest even."""
    bits = np.ascontiguousarray(value, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return helper.make_tensor(name, BF16, value.shape, bits.tobytes(), raw=True)


def _cast_once(fresh: _Names, name: str, to: int, casts: dict[str, str], nodes: list, counts: Counter) -> str:
    """The name of `name` cast to `to`, inserting the Cast the first time it is asked for."""
    if name not in casts:
        casts[name] = fresh(f"{name}_{'bf16' if to == BF16 else 'fp32'}")
        nodes.append(helper.make_node("Cast", [name], [casts[name]], to=to, name=fresh(f"cast_{name}")))
        counts["casts"] += 1
    return casts[name]


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of float32 tensors of the main graph (inputs, initializers, typed values, and outputs of
    nodes whose inputs are all float32 after shape inference)."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for tensor in bare.graph.initializer:  # types and dims are enough; keeps a >2 GB model inferable
        tensor.ClearField("raw_data")
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
    graph = onnx.shape_inference.infer_shapes(bare, data_prop=False, strict_mode=False).graph
    typed = [*graph.input, *graph.value_info, *graph.output]
    names = {v.name for v in typed if v.type.tensor_type.elem_type == FLOAT}
    return names | {t.name for t in graph.initializer if t.data_type == FLOAT}


def _gemm_only_initializers(graph: onnx.GraphProto, gemms: list[onnx.NodeProto]) -> set[str]:
    """Float32 initializers whose every reader is a chosen GEMM (directly or through a 2-D
    Transpose only GEMMs read): these are stored in bf16."""
    inits = {t.name: t for t in graph.initializer if t.data_type == FLOAT}
    chosen = {id(n) for n in gemms}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}

    def gemm_only(name: str) -> bool:
        if name in outputs or not readers[name]:
            return False
        for reader in readers[name]:
            if reader.op_type == "Transpose" and _is_2d_transpose(reader, inits):
                if not gemm_only(reader.output[0]):
                    return False
            elif id(reader) not in chosen:
                return False
        return True

    return {name for name in inits if gemm_only(name)}


def _to(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), -1)
