"""Ahead-of-time compile of the plugin kernels to cubin + PTX on a machine with no GPU."""

from __future__ import annotations

import hashlib

import pytest
import triton

from walkforge.plugins.aot import compile_kernels, parse_arch, ptx_isa, ptx_param_count


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
