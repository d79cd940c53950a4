"""The Q/DQ pass, FP8 (E4M3) or INT8: explicit quantisation of GEMMs and convs.

One pass, parametrised by the quantised dtype (`QDTYPES`):

- `fp8`: FLOAT8E4M3FN, saturating to ±448, what TensorRT fuses into FP8 GEMMs on Hopper/Ada;
  onnxruntime's CPU provider only emulates it (dequantise, fp32 math).
- `int8`: symmetric INT8 (zero points 0, round-to-nearest, ±127), what TensorRT runs on
  Orin/Ampere and what onnxruntime's CPU provider fuses into integer kernels
  (DQ → MatMul ⇒ MatMulIntegerToFloat, VNNI/AMX through MLAS), with QDQ fusion left on.

For every MatMul/Gemm/Conv whose weight is an initializer (directly, or through the
`Transpose` a Linear leaves with `optimize=False`) the pass rewrites

    x ──────────────────────────┐                x → Q(s_x) → DQ(s_x) ─┐
    W (fp32) ───────────────── MatMul    into    W8 (fp8) → DQ(s_w[c]) ─ MatMul

Activations are per-tensor (scalar float32 scale); weights are stored as 1-byte initializers
quantised per output channel. Zero points are zeros of the quantised type: the Q output type
comes from its zero point. The DQ outputs feed the GEMM directly, the placement TensorRT fuses.
onnxruntime on CPU runs fp8 by dequantising (accuracy emulation only): it needs
`session.disable_quant_qdq=1` (graphs/ort.py sets it for every precision but int8) and the
optimizers in `ORT_DISABLED_OPTIMIZERS` turned off (below).

Skipped by default: GEMMs whose weight is an embedding table (a Gather's data, or its
transpose), the first Conv and the last quantisable node of the graph (topological order),
and nodes matched by `exclude`. Nodes inside model-local functions are not touched.
"""

from __future__ import annotations

import ast
import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from walkforge.errors import WalkforgeError
from walkforge.plugins.constants import FP8_MAX

log = logging.getLogger(__name__)

FP8 = onnx.TensorProto.FLOAT8E4M3FN
MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear with float8 types
INT8_MAX = 127.0  # symmetric: [-127, 127], so -w and w quantise alike
INT8_WEIGHT_BITS = (7, 8)  # int8 weights: ±63 (7 bits) or ±127 (8); see int8_weight_max
# The compile's default (`--int8-weight-bits auto`) keeps 7-bit weights where the bundle's
# end-to-end cosine vs fp32 stays at or above this (and --min-cosine), else takes 8 bits: the
# accuracy #15 asks of int8 pi0. Small pi0 keeps 7 bits, full-size pi0 gets 8 (docs/benchmarks.md).
SEVEN_BIT_MIN_COSINE = 0.999


def int8_weight_max(bits: int) -> float:
    """The largest int8 weight magnitude at `bits` (7 → 63, 8 → 127). Weights are quantised per
    output channel, so their scale is amax / this. 7-bit weights keep every u8×s8 pair of
    products within int16 (2·255·63 < 32767), so x86 CPUs without VNNI run them on onnxruntime's
    fast u8×s8 kernels exactly (graphs.ort.int8_pairs_saturate); full-range weights need its
    slower u8×u8 kernels there (docs/cpu.md). VNNI/AMX and TensorRT are exact and as fast either way, and
    8 bits are more accurate, so the compile keeps 7 only where accuracy allows
    (SEVEN_BIT_MIN_COSINE)."""
    if bits not in INT8_WEIGHT_BITS:
        raise WalkforgeError(f"int8 weights have 7 or 8 bits, got {bits!r}")
    return float(2 ** (bits - 1) - 1)


@dataclass(frozen=True)
class QDType:
    """A quantised dtype of the Q/DQ pass: ONNX and numpy types, the largest magnitude it holds,
    and the opset its QuantizeLinear/DequantizeLinear need. `qdq_per_consumer`: an activation
    read by several GEMMs gets a Q → DQ pair per GEMM (onnxruntime fuses a pair into an int8
    GEMM only when it is that GEMM's alone; with one Q shared, none of them fuse)."""

    name: str
    onnx_type: int
    numpy_type: type
    max: float
    min_opset: int
    qdq_per_consumer: bool = False

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Already-scaled float32 values → this dtype (saturating; int8 rounds to nearest even)."""
        x = np.clip(x, -self.max, self.max)
        return (np.rint(x) if self.name == "int8" else x).astype(self.numpy_type)


QDTYPES = {
    "fp8": QDType("fp8", FP8, ml_dtypes.float8_e4m3fn, FP8_MAX, MIN_OPSET),
    "int8": QDType("int8", onnx.TensorProto.INT8, np.int8, INT8_MAX, 13, qdq_per_consumer=True),
}
GEMM_OPS = ("MatMul", "Gemm", "Conv")
NORM_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
            "SimplifiedLayerNormalization", "SkipLayerNormalization")
# onnxruntime's "ReluQuantRewrite" (level 2, not covered by session.disable_quant_qdq) deletes a
# Relu whose only consumer is a QuantizeLinear unless the zero point is int8 -128 / uint8 0: a
# FLOAT8 zero point passes its check, so negative values leak through (measured ORT 1.32:
# cosine 0.93 instead of 0.9998). Pass to InferenceSession(..., disabled_optimizers=...).
ORT_DISABLED_OPTIMIZERS = ("ReluQuantRewrite",)
Exclude = Callable[[onnx.NodeProto], bool] | Collection[str] | None


@dataclass(frozen=True)
class WeightUse:
    """A GEMM/conv node with an initializer weight.

    `axis` is the output-channel axis of `weight` as stored; `transpose` is the 2-D Transpose
    between the initializer and the node, if any (the pass folds it into the quantised copy).
    """

    node: onnx.NodeProto
    activation: str
    weight: str
    axis: int
    transpose: onnx.NodeProto | None = None

    @property
    def name(self) -> str:
        return node_name(self.node)

    @property
    def node_axis(self) -> int:
        """Output-channel axis of the weight as the node sees it (the DQ axis)."""
        return 1 - self.axis if self.transpose is not None else self.axis


def node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def read_tensor(tensor: onnx.TensorProto, base_dir: str | Path | None = None) -> np.ndarray:
    """An initializer's value, reading external data relative to `base_dir` if not loaded."""
    return numpy_helper.to_array(tensor, str(base_dir or ""))


def module_path(node: onnx.NodeProto) -> str:
    """The torch module a dynamo-exported node came from ("fc1", "layers.0.mlp"), or ""."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s]
            return ".".join(scopes[:-1])  # the last scope names the op itself
    return ""


def qdq_scales(amax: Mapping[str, float | np.ndarray], dtype: str = "fp8",
               top: float | None = None) -> dict[str, float | np.ndarray]:
    """amax → scale (amax / 448 for fp8, amax / 127 for int8, or amax / `top`: int8 weights at 7
    bits, int8_weight_max) in float32; zero amax gets a tiny positive scale."""
    top = np.float32(QDTYPES[dtype].max if top is None else top)
    out: dict[str, float | np.ndarray] = {}
    for name, value in amax.items():
        arr = np.maximum(np.asarray(value, dtype=np.float32), np.float32(1e-12)) / top
        out[name] = float(arr) if arr.ndim == 0 else arr.astype(np.float32)
    return out


def fp8_scales(amax: Mapping[str, float | np.ndarray]) -> dict[str, float | np.ndarray]:
    """amax → FP8 E4M3 scale (amax / 448) in float32 (`qdq_scales` for fp8)."""
    return qdq_scales(amax, "fp8")


def weight_uses(model: onnx.ModelProto) -> list[WeightUse]:
    """The MatMul/Gemm/Conv nodes of the main graph whose weight is an initializer, in order."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    uses = []
    for node in graph.node:
        if node.op_type not in GEMM_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        act, w = node.input[0], node.input[1]
        if act in inits:
            continue
        transpose = producers.get(w)
        if transpose is not None and _is_2d_transpose(transpose, inits):
            w = transpose.input[0]
        else:
            transpose = None
        if w not in inits:
            continue
        rank = len(inits[w].dims)
        if node.op_type == "Conv" and rank >= 3:
            axis = 0
        elif node.op_type == "Gemm" and rank == 2:
            axis = 0 if _attr(node, "transB", 0) else 1
        elif node.op_type == "MatMul" and rank == 2:
            axis = 1
        else:
            continue
        if transpose is not None:
            axis = 1 - axis  # channel axis in the stored (pre-Transpose) layout
        uses.append(WeightUse(node, act, w, axis, transpose))
    return uses


def plan_qdq(model: onnx.ModelProto, exclude: Exclude = None,
             base_dir: str | Path | None = None) -> tuple[list[WeightUse], Counter]:
    """Which weight uses `quantize_qdq` rewrites (any dtype), and counts of the ones it skips (by reason)."""
    uses = weight_uses(model)
    excluded = _exclude_predicate(exclude)
    embeddings = _embedding_weights(model, uses, base_dir)
    convs = [u for u in uses if u.node.op_type == "Conv"]
    edge = {id(convs[0].node)} if convs else set()
    edge |= {id(uses[-1].node)} if uses else set()
    chosen, skipped = [], Counter()
    for use in uses:
        if use.weight in embeddings:
            skipped["skipped_embedding"] += 1
        elif id(use.node) in edge:
            skipped["skipped_first_last"] += 1
        elif excluded(use.node):
            skipped["skipped_excluded"] += 1
        else:
            chosen.append(use)
    return chosen, skipped


def quantize_fp8(model: onnx.ModelProto, act_scales: Mapping[str, float],
                 weight_scales: Mapping[str, np.ndarray], exclude: Exclude = None,
                 base_dir: str | Path | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """`quantize_qdq` with FP8 E4M3 (scales from `fp8_scales`)."""
    return quantize_qdq(model, act_scales, weight_scales, exclude, base_dir, "fp8")


def quantize_int8(model: onnx.ModelProto, act_scales: Mapping[str, float],
                  weight_scales: Mapping[str, np.ndarray], exclude: Exclude = None,
                  base_dir: str | Path | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """`quantize_qdq` with symmetric INT8 (scales from `qdq_scales(..., "int8")`)."""
    return quantize_qdq(model, act_scales, weight_scales, exclude, base_dir, "int8")


def quantize_qdq(model: onnx.ModelProto, act_scales: Mapping[str, float],
                 weight_scales: Mapping[str, np.ndarray], exclude: Exclude = None,
                 base_dir: str | Path | None = None, dtype: str = "fp8"
                 ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Insert `dtype` Q/DQ around every quantisable MatMul/Gemm/Conv; modifies and returns `model`.

    `act_scales` maps an activation tensor name to its per-tensor scale, `weight_scales` a
    weight initializer name to its per-output-channel scales (see `qdq_scales`). `exclude` is
    a set of node names or torch module paths ("head"), or a predicate on the node. `base_dir`
    locates external weight data not loaded into `model`. Returns counts: quantized_matmul/
    gemm/conv, qdq_pairs (activation Q→DQ pairs), weights_<dtype>, skipped_first_last/
    embedding/excluded/norms.
    """
    qd = QDTYPES[dtype]
    uses, counts = plan_qdq(model, exclude, base_dir)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    before: dict[int, list[onnx.NodeProto]] = {}  # id(consumer) → nodes to insert before it
    act_dq: dict[str, onnx.NodeProto] = {}  # activation → its (first) DequantizeLinear
    weight_dq: dict[str, str] = {}
    fresh = _Names(graph)
    zero = fresh(f"{dtype}_zero")
    new_inits = [numpy_helper.from_array(np.zeros((), qd.numpy_type), zero)] if uses else []
    for use in uses:
        inserted = before.setdefault(id(use.node), [])
        if use.activation not in act_dq:
            act_dq[use.activation] = _quantize_activation(fresh, use, act_scales, zero, inserted,
                                                          new_inits, dtype)
        elif qd.qdq_per_consumer:  # onnxruntime fuses a DQ into a GEMM only if it is its sole reader
            use.node.input[0] = _qdq_copy(fresh, use.activation, act_dq[use.activation], inserted)
            counts["qdq_copies"] += 1
        key = f"{use.weight}|{use.transpose is not None}"
        if key not in weight_dq:
            weight_dq[key] = _quantize_weight(fresh, use, inits[use.weight], weight_scales, base_dir,
                                              inserted, new_inits, qd)
        if use.node.input[0] == use.activation:
            use.node.input[0] = act_dq[use.activation].output[0]
        use.node.input[1] = weight_dq[key]
        counts[f"quantized_{use.node.op_type.lower()}"] += 1
    nodes = [new for node in graph.node for new in (*before.get(id(node), []), node)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _drop_unused(graph, {u.weight for u in uses}, {u.transpose.output[0] for u in uses if u.transpose})
    _ensure_opset(model, qd.min_opset)
    counts["qdq_pairs"] = len(act_dq)
    counts[f"weights_{dtype}"] = len(weight_dq)
    counts["skipped_norms"] = count_norms(model)
    result = {k: counts.get(k, 0) for k in (
        "quantized_matmul", "quantized_gemm", "quantized_conv", "qdq_pairs", f"weights_{dtype}",
        *(("qdq_copies",) if qd.qdq_per_consumer else ()), "skipped_first_last", "skipped_embedding",
        "skipped_excluded", "skipped_norms")}
    log.info("%s: %s", dtype, result)
    return model, result


def count_norms(model: onnx.ModelProto) -> int:
    """Norm ops in the main graph: fused norm ops plus RMSNorm-style ReduceMean(Pow(x, 2))."""
    producers = {out: n for n in model.graph.node for out in n.output}
    fused = sum(n.op_type in NORM_OPS for n in model.graph.node)
    rms = sum(n.op_type == "ReduceMean" and getattr(producers.get(n.input[0]), "op_type", "") == "Pow"
              for n in model.graph.node)
    return fused + rms


def _quantize_activation(fresh: _Names, use: WeightUse, act_scales: Mapping[str, float],
                         zero: str, inserted: list, new_inits: list, dtype: str) -> onnx.NodeProto:
    if use.activation not in act_scales:
        raise WalkforgeError(f"{dtype}: no activation scale for '{use.activation}' (input of node "
                             f"'{use.name}'); calibration does not match this graph")
    scale = fresh(f"{use.activation}_{dtype}_scale")
    q, dq = fresh(f"{use.activation}_{dtype}"), fresh(f"{use.activation}_{dtype}_dq")
    new_inits.append(numpy_helper.from_array(np.array(act_scales[use.activation], np.float32), scale))
    inserted += [
        onnx.helper.make_node("QuantizeLinear", [use.activation, scale, zero], [q], name=fresh(q + "_q")),
        onnx.helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=dq),
    ]
    return inserted[-1]


def _qdq_copy(fresh: _Names, activation: str, dq: onnx.NodeProto, inserted: list) -> str:
    """Another Q → DQ of `activation` with `dq`'s scale and zero point, for one more consumer."""
    q, out = fresh(dq.input[0]), fresh(dq.output[0])
    inserted += [onnx.helper.make_node("QuantizeLinear", [activation, *dq.input[1:]], [q], name=q),
                 onnx.helper.make_node("DequantizeLinear", [q, *dq.input[1:]], [out], name=out)]
    return out


def _quantize_weight(fresh: _Names, use: WeightUse, tensor: onnx.TensorProto,
                     weight_scales: Mapping[str, np.ndarray], base_dir: str | Path | None,
                     inserted: list, new_inits: list, qd: QDType) -> str:
    w = read_tensor(tensor, base_dir).astype(np.float32)
    scale = np.asarray(weight_scales.get(use.weight, ()), np.float32).ravel()
    if scale.shape != (w.shape[use.axis],):
        raise WalkforgeError(f"{qd.name}: weight '{use.weight}' {list(w.shape)} needs {w.shape[use.axis]} "
                             f"channel scales (axis {use.axis}), got {list(scale.shape)}")
    if use.transpose is not None:
        w = w.T  # fold the Linear's Transpose: store the layout the node consumes
    axis = use.node_axis
    shape = [1] * w.ndim
    shape[axis] = -1
    q = qd.quantize(w / scale.reshape(shape))
    scope = module_path(use.node)  # optimize=True renames folded weights to val_N
    base = f"{scope}.weight" if scope else use.weight + ("_t" if use.transpose is not None else "")
    names = [fresh(f"{base}_{qd.name}{s}") for s in ("", "_scale", "_zero", "_dq")]
    new_inits += [numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
                  numpy_helper.from_array(np.zeros(scale.shape, qd.numpy_type), names[2])]
    inserted.append(onnx.helper.make_node("DequantizeLinear", names[:3], [names[3]], name=names[3],
                                          axis=axis))
    return names[3]


def _embedding_weights(model: onnx.ModelProto, uses: list[WeightUse],
                       base_dir: str | Path | None) -> set[str]:
    """Gather tables, plus GEMM weights equal to a table's transpose (tied heads, constant-folded)."""
    inits = {t.name: t for t in model.graph.initializer}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    found = {u.weight for u in uses if u.weight in tables}
    for table in tables:
        dims = list(inits[table].dims)
        for use in uses:
            w = inits[use.weight]
            if use.weight not in found and len(dims) == 2 and list(w.dims) == dims[::-1] and np.array_equal(
                    read_tensor(w, base_dir), read_tensor(inits[table], base_dir).T):
                found.add(use.weight)
    return found


def _exclude_predicate(exclude: Exclude) -> Callable[[onnx.NodeProto], bool]:
    if exclude is None:
        return lambda node: False
    if callable(exclude):
        return exclude
    names = set(exclude)
    return lambda node: node_name(node) in names or module_path(node) in names


def _drop_unused(graph: onnx.GraphProto, weights: set[str], transposes: set[str]) -> None:
    """Remove folded Transposes (by output name) and fp32 weights that nothing reads any more."""
    used = _used_names(graph)
    keep = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in transposes - used)]
    if len(keep) < len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
        used = _used_names(graph)
    keep_inits = [t for t in graph.initializer if t.name not in weights or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:  # subgraphs may read outer-scope initializers
            for sub in [attr.g, *attr.graphs] if attr.type in (attr.GRAPH, attr.GRAPHS) else []:
                used |= _used_names(sub)
    return used


def _is_2d_transpose(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    return (node.op_type == "Transpose" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2
            and list(_attr(node, "perm", [1, 0])) == [1, 0])


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


class _Names:
    """Fresh tensor/node names: `name`, suffixed where the graph (or this pass) already uses it."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
        self.taken |= {o for n in graph.node for o in (*n.output, n.name)}

    def __call__(self, name: str) -> str:
        candidate, k = name, 0
        while candidate in self.taken:
            k += 1
            candidate = f"{name}_{k}"
        self.taken.add(candidate)
        return candidate


def _ensure_opset(model: onnx.ModelProto, opset: int = MIN_OPSET) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
            return
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
