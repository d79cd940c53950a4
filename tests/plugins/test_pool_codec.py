"""One ONNX body per op, the pool dtype's codec inlined (walkforge.plugins.pool_codec)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from walkforge.plugins import OPS
from walkforge.plugins.pool_codec import CODEC_DOMAIN, CODECS, FP8_DECODE, function_proto


def _reads(proto: onnx.FunctionProto, name: str) -> bool:
    return any(name in node.input for node in proto.node)


@pytest.mark.parametrize("pool_dtype", sorted(CODECS))
@pytest.mark.parametrize("name", sorted(OPS))
def test_bodies_inline_the_codec_and_pin_the_opset(name, pool_dtype):
    proto = function_proto(OPS[name].BODY, 19, name, pool_dtype)
    assert proto.name == name and proto.domain == "walkforge"
    assert {node.domain for node in proto.node} == {""}  # no codec placeholder is left
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 19)]
    assert list(proto.input) == [p.name for p in OPS[name].SCHEMA.inputs]
    assert _reads(proto, "kv_scales") == (pool_dtype != "float32")  # a float32 pool may omit kv_scales


def test_fp8_bodies_differ_only_by_the_codec():
    """The fp8 body is the float32 body plus the decode (a byte -> value table lookup times the
    scale) or the encode (a saturating Cast to E4M3, then bytes); every float32 op stays."""
    for name, module in OPS.items():
        plain = [n.op_type for n in function_proto(module.BODY, 19, name, "float32").node]
        fp8 = function_proto(module.BODY, 19, name, "float8_e4m3fn")
        kept = [t for t in plain if t != "Identity"]  # the float32 codec is the identity
        remaining = [n.op_type for n in fp8.node]
        for op_type in kept:
            remaining.remove(op_type)
        assert len(remaining) >= 3, name
    attention = function_proto(OPS["PagedAttention"].BODY, 19, "PagedAttention", "float8_e4m3fn")
    tables = [np.array(a.floats) for n in attention.node for a in n.attribute if a.name == "value_floats"]
    assert sum(np.array_equal(t, FP8_DECODE, equal_nan=True) for t in tables) == 2  # K and V pages
    write = function_proto(OPS["KVCacheWrite"].BODY, 19, "KVCacheWrite", "float8_e4m3fn")
    casts = {a.i for n in write.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.UINT8} <= casts


def test_unknown_pool_dtype_is_refused():
    with pytest.raises(ValueError, match="no ONNX pool codec for 'bfloat16'"):
        function_proto(OPS["PagedAttention"].BODY, 19, "PagedAttention", "bfloat16")
    assert CODEC_DOMAIN != "walkforge"
