"""The custom ops' kernels on a CUDA GPU vs their eager references (walkforge/plugins), on every
plugin case (tests/plugins/plugin_cases.py) and both pool dtypes:

- the Triton kernels, JIT-compiled, as `*_triton` launches them;
- `torch.ops.walkforge.*` on CUDA tensors with bf16 activations, the way torch-cuda calls them;
- the AOT records (`plugins.aot.compile_kernels` for this GPU's arch), cubin and PTX, loaded and
  launched through the CUDA driver by `plugins.aot.launch_aot`, as TensorRT's AOT plugins run them.

gpu-marked tests skip with a reason where torch sees no CUDA device (conftest.py); the unmarked
ones check on CPU what the launcher passes and which device gets which kernel.
"""

from __future__ import annotations

import functools

import pytest
import torch
from plugin_cases import ALL_CASES, HEADS, case_tol, dense_attention, fp8_pool, make_inputs
from tolerances import BF16_EPS, rel_err

POOL_DTYPES = ("float32", "float8_e4m3fn")
CASES = {case.id: case for case in ALL_CASES}
PI0_LIKE = CASES["ps16-kvh1-d256-s51-b4"]  # pi0's page size, KV heads, head dim and suffix length
BF16_TOL = BF16_EPS
"""bf16 activations in and out: the output's own bf16 rounding (≤ 2**-9 relative) plus the fp32
attention differences (case_tol, < 2e-5) stay below one bf16 step; a wrong cast costs far more."""


def with_pool(x: dict, pool_dtype: str) -> dict:
    """Case inputs `x` with their pool as `pool_dtype` (fp8: x's values quantised with x's kv_scales)."""
    return x if pool_dtype == "float32" else {**x, "pool": fp8_pool(x["pool"], x["kv_scales"])}


def cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def skip_without_fp8(pool_dtype: str) -> None:
    from walkforge.plugins.aot import FP8_MIN_ARCH, parse_arch

    if pool_dtype != "float32" and parse_arch(cuda_arch()) < FP8_MIN_ARCH:
        pytest.skip(f"an fp8 pool needs sm_{FP8_MIN_ARCH} or later (Triton's float8e4nv); this GPU is "
                    f"{cuda_arch()}")  # fmt: skip


def same_bytes(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-for-bit equal: a float32 pool write is a copy, an fp8 one is x / scale (div_rn) rounded
    to nearest even on both sides, so either is exact."""
    return torch.equal(got.cpu().contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))


# ---------------------------------------------------------------- Triton (JIT) vs the eager ops


@pytest.mark.gpu
@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda case: case.id)
def test_kv_cache_write_kernel_matches_the_eager_op(case, pool_dtype):
    from walkforge.plugins import kv_cache_write as kvw

    skip_without_fp8(pool_dtype)
    x = with_pool(make_inputs(case), pool_dtype)
    written = kvw.kv_cache_write_triton(*kvw.case_args(x, "cuda"))
    assert same_bytes(written, kvw.kv_cache_write(*kvw.case_args(x)))


@pytest.mark.gpu
@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda case: case.id)
def test_paged_attention_kernel_matches_the_eager_op(case, pool_dtype):
    from walkforge.plugins import paged_attention as pa

    skip_without_fp8(pool_dtype)
    x = with_pool(make_inputs(case), pool_dtype)
    out = pa.paged_attention_triton(*pa.case_args(x, "cuda"))
    assert rel_err(out, pa.paged_attention(*pa.case_args(x))) <= case_tol(case)


@pytest.mark.gpu
@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
def test_torch_ops_on_cuda_run_the_kernels_with_bf16_activations(pool_dtype):
    """q/k/v in bf16, the pool float32 or fp8: what the torch-cuda backend's modules pass."""
    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa
    from walkforge.plugins import register_cuda_kernels

    skip_without_fp8(pool_dtype)
    register_cuda_kernels()
    x = with_pool(make_inputs(PI0_LIKE), pool_dtype)
    bf16 = {**x, **{name: x[name].bfloat16() for name in ("q", "k_all", "v_all")}}
    held = {**x, **{name: bf16[name].float() for name in ("q", "k_all", "v_all")}}  # the values bf16 holds
    out = torch.ops.walkforge.paged_attention(*pa.case_args(bf16, "cuda"))
    assert out.dtype == torch.bfloat16
    assert rel_err(out, pa.paged_attention(*pa.case_args(held))) <= BF16_TOL
    pool = torch.ops.walkforge.kv_cache_write(*kvw.case_args(bf16, "cuda"))
    assert same_bytes(pool, kvw.kv_cache_write(*kvw.case_args(held)))


def test_cuda_kernels_register_for_cuda_and_leave_cpu_on_the_reference():
    from walkforge.plugins import paged_attention as pa
    from walkforge.plugins import register_cuda_kernels

    register_cuda_kernels()
    register_cuda_kernels()  # idempotent
    for op in ("walkforge::paged_attention", "walkforge::kv_cache_write"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    case = CASES["ps8-kvh2-d16-s51-b4"]
    x = make_inputs(case)
    # CPU tensors still reach the eager op: the Triton kernel would refuse them without TRITON_INTERPRET
    out = torch.ops.walkforge.paged_attention(*pa.case_args(x))
    assert rel_err(out, dense_attention(*pa.case_args(x)[:-1])) <= case_tol(case)


# ---------------------------------------------------------------- AOT records through the CUDA driver


@functools.cache
def aot_records(arch: str, pool_dtype: str) -> list[dict]:
    """Every plugin kernel compiled ahead of time for `arch`, specialised for PI0_LIKE's shapes."""
    from walkforge.plugins.aot import compile_kernels

    case = PI0_LIKE
    return compile_kernels((arch,), num_heads=HEADS, kv_heads=case.kv_heads, head_dim=case.head_dim,
                           page_size=case.page_size, pool_dtype=pool_dtype)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("image", ["cubin", "ptx"])
@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
def test_aot_kernels_launched_through_the_driver_match_the_eager_ops(image, pool_dtype):
    """The cubin as loaded, the PTX as JIT-compiled by the driver: a driver older than the PTX ISA
    that this Triton writes refuses it, and the failure names both."""
    cupy = pytest.importorskip("cupy", reason="launching AOT records needs cupy (the CUDA driver API)")
    from walkforge.plugins import aot
    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa

    skip_without_fp8(pool_dtype)
    x = with_pool(make_inputs(PI0_LIKE), pool_dtype)
    driver = cupy.cuda.driver.driverGetVersion()
    records = aot_records(cuda_arch(), pool_dtype)
    assert {aot.op_of_kernel(r["kernel"]) for r in records} == {kvw, pa}
    for record in records:
        try:
            out = aot.launch_aot(record, image, x)
        except cupy.cuda.driver.CUDADriverError as exc:
            pytest.fail(f"CUDA driver {driver} refused {record['kernel']} {image} "
                        f"(PTX ISA {record['ptx_isa']}): {exc}")  # fmt: skip
        if aot.op_of_kernel(record["kernel"]) is kvw:
            assert same_bytes(out, kvw.kv_cache_write(*kvw.case_args(x))), record["kernel"]
        else:
            assert rel_err(out, pa.paged_attention(*pa.case_args(x))) <= case_tol(PI0_LIKE), record["kernel"]


def test_aot_arguments_cover_each_signature_and_match_the_launch_grid():
    """What launch_aot passes, checked on CPU tensors: every signature name has a value of its
    kind, and the grid rule gives the grid the Triton launcher uses."""
    from walkforge.plugins import aot
    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa

    case = PI0_LIKE
    x = make_inputs(case)
    dims = aot.KernelDims(HEADS, case.kv_heads, case.head_dim, case.page_size, case.head_dim**-0.5)
    grids = {kvw: (case.seq, case.batch, 1), pa: (4, HEADS, case.batch)}  # cdiv(51, BLOCK_M = 16) = 4
    for op, grid in grids.items():
        values, shapes, _ = aot.aot_values(op.AOT.name, x, device="cpu")
        args = [aot.c_arg(values[name.removesuffix("_ptr")], kind) for name, kind in op.AOT.signature.items()]
        assert len(args) == len(op.AOT.signature)
        assert aot.eval_grid(op.AOT.grid, shapes, op.AOT.constexprs(dims)) == grid


def test_eval_grid_evaluates_the_plugin_rules():
    from walkforge.plugins import aot
    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa

    assert aot.eval_grid(kvw.GRID_RULE, {"k": (18, 2, 1, 816, 256)}, {}) == (816, 2, 1)
    config = pa.launch_config(8, 1, 256, 16, 256**-0.5)
    assert aot.eval_grid(pa.GRID_RULE, {"q": (4, 8, 51, 256)}, config) == (4, 8, 4)  # cdiv(51, 16)
    assert aot.eval_grid("(X * 2 - 1, 3): X = t.shape[-1]", {"t": (5, 7)}, {}) == (13, 3, 1)
    with pytest.raises(ValueError, match="unsupported grid expression"):
        aot.eval_grid("(__import__('os'),): X = t.shape[0]", {"t": (1,)}, {})


# ---------------------------------------------------------------- the loader's choice on this GPU


@pytest.mark.gpu
def test_the_image_the_loader_selects_runs_on_this_gpu():
    """plugins.arch.select_kernel on this device and driver: from this arch's records (the exact
    cubin) and from sm_80's alone (PTX JIT-compiled forward, or sm_80's cubin on an 8.x device)."""
    cupy = pytest.importorskip("cupy", reason="launching AOT records needs cupy (the CUDA driver API)")
    from walkforge.plugins import aot
    from walkforge.plugins import paged_attention as pa
    from walkforge.plugins.arch import select_kernel

    version = cupy.cuda.driver.driverGetVersion()
    driver, cc = (version // 1000, (version % 1000) // 10), torch.cuda.get_device_capability()
    x = make_inputs(PI0_LIKE)
    want = pa.paged_attention(*pa.case_args(x))
    for arch in dict.fromkeys((cuda_arch(), "sm_80")):
        records = aot_records(arch, "float32")
        name = torch.cuda.get_device_name()
        choice = select_kernel(records, aot.kernel_name(pa.AOT.name), cc, driver, name)
        if arch == cuda_arch():
            assert choice.image == "cubin", choice.reason
        got = aot.launch_aot(choice.record, choice.image, x)
        assert rel_err(got, want) <= case_tol(PI0_LIKE), choice.reason


@pytest.mark.gpu
def test_gpu_check_sections_report_no_failures():
    """The prepared script's kernel, AOT and attention sections on this GPU (its pi0 section is the
    long one: run tests/gpu/gpu_check.py for it)."""
    from tests.gpu import gpu_check

    rows = gpu_check.run_sections([(name, fn) for name, fn in gpu_check.SECTIONS], budget_s=300)
    bad = [row for row in rows if row[2] in ("FAIL", "ERROR")]
    assert not bad, gpu_check.markdown(bad)
