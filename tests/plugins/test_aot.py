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


# ---------------------------------------------------------------- which image runs on which device


def _rec(arch: str, target: str, isa: str = "8.8", kernel: str = "paged_attention_kernel") -> dict:
    """A fake AOT record: only what `select_kernel` reads."""
    return {"kernel": kernel, "arch": arch, "ptx_target": target, "ptx_isa": isa}


DEFAULT_BUNDLE = [_rec("sm_80", "sm_80"), _rec("sm_86", "sm_86"), _rec("sm_87", "sm_87"),
                  _rec("sm_89", "sm_89"), _rec("sm_90", "sm_90a", "9.4"), _rec("sm_100", "sm_100a", "9.4"),
                  _rec("sm_110", "sm_110a", "9.4"), _rec("sm_120", "sm_120a", "9.4")]  # fmt: skip
CUDA_13_0, CUDA_13_4 = (13, 0), (13, 4)


@pytest.mark.parametrize("cc, driver, image, target", [
    ((8, 6), CUDA_13_0, "cubin", "sm_86"),       # RTX 3090 / A10: exact cubin
    ((8, 7), CUDA_13_0, "cubin", "sm_87"),       # Jetson Orin
    ((9, 0), CUDA_13_4, "cubin", "sm_90a"),      # H100/H200: arch-specific cubin, exact
    ((8, 9), (12, 4), "cubin", "sm_89"),         # an old driver still runs a cubin
    ((10, 3), CUDA_13_4, "ptx", "sm_89"),        # B300: sm_100a is arch-specific; newest plain PTX
    ((12, 1), CUDA_13_0, "ptx", "sm_89"),        # DGX Spark: sm_120a PTX cannot JIT to 12.1
])  # fmt: skip
def test_select_kernel_follows_cuda_compatibility(cc, driver, image, target):
    from walkforge.plugins.arch import record_target, select_kernel

    choice = select_kernel(DEFAULT_BUNDLE, "paged_attention_kernel", cc, driver)
    assert (choice.image, str(record_target(choice.record))) == (image, target)


def test_select_kernel_prefers_newest_jit_able_ptx_then_an_older_cubin():
    from walkforge.plugins.arch import select_kernel

    bundle = [_rec("sm_80", "sm_80", "8.8"), _rec("sm_86", "sm_86", "8.8")]
    assert select_kernel(bundle, "paged_attention_kernel", (8, 9), CUDA_13_0).record["arch"] == "sm_86"
    # a CUDA 12.4 driver cannot JIT ISA 8.8: the sm_86 cubin runs on 8.9 unchanged (same major)
    old = select_kernel(bundle, "paged_attention_kernel", (8, 9), (12, 4))
    assert (old.image, old.record["arch"]) == ("cubin", "sm_86")


def test_ptx_the_driver_cannot_jit_is_refused_naming_isa_and_driver():
    from walkforge.errors import WalkforgeError
    from walkforge.plugins.arch import select_kernel

    with pytest.raises(WalkforgeError, match=r"PTX ISA 9\.4.*CUDA 13\.4.*supports CUDA 13\.0") as err:
        select_kernel([_rec("sm_90", "sm_90", "9.4")], "paged_attention_kernel", (12, 0), CUDA_13_0,
                      "NVIDIA GeForce RTX 5090")  # fmt: skip
    assert "\n" not in str(err.value) and "RTX 5090 (sm_120)" in str(err.value)


def test_no_runnable_kernel_names_the_device_and_the_bundle_archs():
    from walkforge.errors import WalkforgeError
    from walkforge.plugins.arch import select_kernel

    bundle = [_rec("sm_90", "sm_90a", "9.4"), _rec("sm_89", "sm_89")]
    with pytest.raises(WalkforgeError, match=r"Orin \(sm_87\).*has: sm_89, sm_90a.*--gpu-archs sm_87"):
        select_kernel(bundle, "paged_attention_kernel", (8, 7), CUDA_13_0, "Orin")
    with pytest.raises(WalkforgeError, match="has: none"):  # TensorRT takes PTX only
        select_kernel(bundle, "kv_cache_write_kernel", (9, 0), CUDA_13_0, images=("ptx",))


def test_ptx_isa_to_driver_table():
    from walkforge.plugins.arch import Target, min_driver, ptx_cuda

    assert min_driver("8.8") == "CUDA 12.9 (driver >= 575.51.03)" and ptx_cuda("8.5") == (12, 5)
    assert min_driver("9.0") == "CUDA 13.0 (driver >= 580.65.06)" and ptx_cuda("9.4") == (13, 4)
    assert Target.parse("sm_121") == Target(12, 1) and str(Target.parse("sm_100a")) == "sm_100a"


def test_fp8_is_refused_before_sm_89_in_one_line():
    from walkforge.compiler.kernels import fp8_warning
    from walkforge.errors import WalkforgeError
    from walkforge.plugins.arch import check_fp8

    check_fp8((8, 9))
    with pytest.raises(WalkforgeError, match=r"RTX 3090 \(sm_86\) has no FP8"):
        check_fp8((8, 6), "RTX 3090")
    warning = fp8_warning(("sm_86", "sm_87", "sm_90"), "fp8", "fp32")
    assert "sm_86, sm_87" in warning and "sm_90" not in warning and "FP8 KV pool" in warning
    assert fp8_warning(("sm_86",), "fp32", "bf16") == ""


def test_compiled_records_carry_target_and_minimum_driver():
    from walkforge.plugins.arch import ptx_jits, record_target

    records = compile_kernels(("sm_86",), num_heads=8, kv_heads=1, head_dim=256)
    for record in records:
        assert record["ptx_target"] == "sm_86" and record["ptx_min_driver"].startswith("CUDA 1")
        assert ptx_jits(record_target(record), (8, 9)) and not ptx_jits(record_target(record), (8, 0))
