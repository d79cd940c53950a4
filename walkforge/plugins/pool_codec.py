"""How the ONNX function bodies read and write page pool values, by pool dtype.

Each op has ONE onnxscript body. Where it reads pool pages it calls `DecodePages` and where it
makes the values it writes it calls `EncodeUpdates`, two placeholder functions of the private
domain `CODEC_DOMAIN`. `function_proto(body, opset, name, pool_dtype)` inlines the pool dtype's
codec there, so no placeholder is left in a bundle:

    float32         both are Identity; `kv_scales` is never read (it may be absent)
    float8_e4m3fn   the pool travels as UINT8 E4M3 bytes (onnxruntime's Gather, ScatterND and
                    Concat reject float8 tensors and ONNX has no bitcast): pages are decoded by a
                    256-entry value table times the layer's K/V scale; updates are divided by
                    their scale, rounded to E4M3 (saturating Cast) and encoded to their bytes
                    arithmetically. Needs opset >= 19.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx import inliner
from onnxscript import opset18 as op
from onnxscript import opset19 as op19
from onnxscript import script

CODEC_DOMAIN = "walkforge.pool_codec"
_CODEC = onnxscript.values.Opset(CODEC_DOMAIN, 1)
FLOAT, FLOAT8E4M3FN, UINT8 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.UINT8
INT32 = onnx.TensorProto.INT32
INV_LN2 = 1.4426950408889634


def fp8_decode_table() -> list[float]:
    """Value of every float8_e4m3fn byte 0..255 (0x7F and 0xFF are NaN): the fp8 bodies' decoder."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return codes.view(torch.float8_e4m3fn).float().tolist()


FP8_DECODE = fp8_decode_table()


@script(_CODEC, default_opset=op)
def DecodePages(pages, kv_scales, layer, kv):  # noqa: N802 (ONNX function name)
    """float32 pages of layer `layer`, K (kv = 0) or V (kv = 1), as float32: as they are."""
    return op.Identity(pages)


@script(_CODEC, default_opset=op)
def EncodeUpdates(updates, kv_scales):  # noqa: N802
    """float32 updates [L, 2, N, KVH, D] as a float32 pool stores them: as they are."""
    return op.Identity(updates)


@script(_CODEC, default_opset=op19)
def DecodePagesFP8(pages, kv_scales, layer, kv):  # noqa: N802
    """E4M3 bytes of layer `layer`'s K or V pages -> float32: the byte's value times kv_scales[layer, kv]."""
    decode = op19.Constant(value_floats=FP8_DECODE)  # [256]
    scale = op19.Gather(op19.Gather(kv_scales, layer, axis=0), kv, axis=0)
    return op19.Mul(op19.Gather(decode, op19.Cast(pages, to=INT32), axis=0), scale)


@script(_CODEC, default_opset=op19)
def EncodeUpdatesFP8(updates, kv_scales):  # noqa: N802
    """float32 updates [L, 2, N, KVH, D] -> E4M3 bytes of updates / kv_scales (saturating, nearest even).

    ONNX has no bitcast, so the byte is computed: with r the fp8 value, a = |r|,
    e = max(floor(log2 a), -6), byte = 8e + 48 + 8 a 2^-e (+128 if negative); e = -6 also covers
    the subnormals (512 a). log2 is corrected by one step where Log rounds across 2^e.
    """
    x = op19.Div(updates, op19.Reshape(kv_scales, [0, 2, 1, 1, 1]))
    r = op19.Cast(op19.Cast(x, to=FLOAT8E4M3FN, saturate=1), to=FLOAT)  # the fp8 value, exact in float
    a = op19.Abs(r)
    e = op19.Floor(op19.Mul(op19.Log(a), op19.Constant(value_float=INV_LN2)))
    two = op19.Constant(value_float=2.0)
    p = op19.Pow(two, e)
    e = op19.Add(op19.Sub(e, op19.Cast(op19.Greater(p, a), to=FLOAT)),
                 op19.Cast(op19.LessOrEqual(op19.Mul(p, two), a), to=FLOAT))  # fmt: skip
    e = op19.Max(e, op19.Constant(value_float=-6.0))
    eight = op19.Constant(value_float=8.0)
    mag = op19.Add(op19.Mul(eight, op19.Add(e, op19.Constant(value_float=6.0))),
                   op19.Mul(eight, op19.Mul(a, op19.Pow(two, op19.Neg(e)))))  # fmt: skip
    sign = op19.Mul(op19.Cast(op19.Less(x, op19.Constant(value_float=0.0)), to=FLOAT),
                    op19.Constant(value_float=128.0))  # fmt: skip
    return op19.Cast(op19.Add(mag, sign), to=UINT8)


CODECS = {
    "float32": (DecodePages, EncodeUpdates),
    "float8_e4m3fn": (DecodePagesFP8, EncodeUpdatesFP8),
}
"""Pool dtype -> the functions inlined for (DecodePages, EncodeUpdates)."""


def _pinned(function: onnxscript.OnnxFunction, opset: int, name: str) -> onnx.FunctionProto:
    """`function` as a FunctionProto named `name` importing standard opset `opset` and the codec domain."""
    proto = function.to_function_proto()
    proto.name = name
    del proto.opset_import[:]
    proto.opset_import.extend(onnx.helper.make_opsetid(domain, version)
                              for domain, version in (("", opset), (CODEC_DOMAIN, 1)))  # fmt: skip
    return proto


def function_proto(body: onnxscript.OnnxFunction, opset: int, name: str | None = None,
                   pool_dtype: str = "float32") -> onnx.FunctionProto:
    """The FunctionProto of an op's onnxscript body for a `pool_dtype` pool: the codec inlined, the
    standard ops pinned to the model's `opset`, named `name` (the op; default: the body's name)."""
    if pool_dtype not in CODECS:
        raise ValueError(f"no ONNX pool codec for {pool_dtype!r}; pools are {sorted(CODECS)}")
    proto = _pinned(body, opset, name or body.name)
    codecs = [_pinned(codec, opset, placeholder.name)
              for placeholder, codec in zip((DecodePages, EncodeUpdates), CODECS[pool_dtype], strict=True)]
    holder = onnx.helper.make_model(onnx.helper.make_graph([], "codec", [], []), functions=[proto, *codecs],
                                    opset_imports=proto.opset_import)  # fmt: skip
    holder = inliner.inline_selected_functions(holder, [(CODEC_DOMAIN, c.name) for c in codecs])
    (proto,) = [f for f in holder.functions if f.name == proto.name]
    del proto.opset_import[:]
    proto.opset_import.append(onnx.helper.make_opsetid("", opset))
    return proto
