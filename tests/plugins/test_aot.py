"""Ahead-of-time compile of the plugin kernels to cubin + PTX on a machine with no GPU."""

from __future__ import annotations

import hashlib

import pytest
import triton

from walkforge.plugins import kv_cache_write as kvw
from walkforge.plugins import paged_attention as pa
from walkforge.plugins.aot import (
    compile_kernels,
    eval_grid,
    kernel_name,
    op_of_kernel,
    parse_arch,
    ptx_isa,
    ptx_param_count,
)


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_compile_kernels_for_arch(arch):
    records = compile_kernels((arch,), num_heads=8, kv_heads=1, head_dim=256)
    assert [r["kernel"] for r in records] == ["kv_cache_write_kernel", "paged_attention_kernel"]
    for record in records:
        assert record["arch"] == arch and record["triton_version"] == triton.__version__
        assert len(record["cubin"]) > 1000 and record["cubin"][:4] == b"\x7fELF"
        assert f".target {arch}" in record["ptx"]
        assert record["ptx_isa"] == ptx_isa(record["ptx"]) and float(record["ptx_isa"]) >= 7.0
        assert record["sha256"] == hashlib.sha256(record["cubin"]).hexdigest()
        assert record["constexprs"]["HEAD_DIM"] == 256 and record["num_warps"] == 4
        assert "grid" in record and record["shared_mem"] >= 0 and record["block_dim"] == 128
        assert record["hidden_params"] == 2 and record["global_scratch_size"] == 0
    attention = records[1]
    assert attention["signature"]["mask_ptr"] == "*i1" and attention["signature"]["layer"] == "i32"
    assert attention["constexprs"]["SCALE"] == pytest.approx(256**-0.5)


def test_parse_helpers():
    assert parse_arch("sm_89") == 89
    with pytest.raises(ValueError):
        parse_arch("gfx90a")
    ptx = "//\n.version 8.7\n.target sm_90\n.visible .entry f(\n.param .u64 f_0,\n.param .u32 f_1\n)\n{"
    assert ptx_isa(ptx) == "8.7" and ptx_param_count(ptx, "f") == 2


def test_eval_grid_takes_constexprs_shapes_and_a_symbolic_cdiv():
    config = pa.launch_config(8, 1, 256, 16, 256**-0.5)  # BLOCK_M = 16
    assert eval_grid(pa.GRID_RULE, {"q": (2, 8, 33, 256)}, config) == (3, 8, 2)
    calls = []

    def cdiv(a, b):  # what TensorRT's trtp.cdiv gets: its shape expressions and the constexpr
        calls.append((a, b))
        return f"cdiv({a}, {b})"

    shapes = {"q": ("B", "H", "S", "D")}
    assert eval_grid(pa.GRID_RULE, shapes, config, cdiv=cdiv) == ("cdiv(S, 16)", "H", "B")
    assert calls == [("S", 16)]
    assert eval_grid(kvw.GRID_RULE, {"k": ("L", "B", "KVH", "S", "D")}, {}) == ("S", "B", 1)


@pytest.mark.parametrize(("rule", "error"), [
    ("(X,): X = t.size(0)", "is not 'NAME = tensor.shape"),
    ("(1, 1, 1, 1)", "has 4 dims"),
    ("(X ** 2,): X = t.shape[0]", "unsupported grid expression"),
])  # fmt: skip
def test_eval_grid_refuses_what_it_cannot_evaluate(rule, error):
    with pytest.raises(ValueError, match=error):
        eval_grid(rule, {"t": (3,)}, {})


def test_records_name_their_op_for_both_pool_dtypes():
    for op in (kvw, pa):
        assert op_of_kernel(op.AOT.name) is op
        assert op_of_kernel(kernel_name(op.AOT.name, "float8_e4m3fn")) is op
    with pytest.raises(ValueError, match="no walkforge op has kernel 'nope'"):
        op_of_kernel("nope")
