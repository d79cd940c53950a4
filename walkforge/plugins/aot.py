"""Ahead-of-time compilation of the plugin Triton kernels to cubin + PTX, no GPU needed.

Each record holds what a bundle needs to launch the kernel later (DESIGN.md, "Custom ops"):
the binary, its PTX and PTX ISA (a driver older than the PTX ISA rejects it), the argument
signature, the constexprs it was specialised for, launch width, shared memory and the grid rule.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from walkforge.plugins import kv_cache_write, paged_attention
from walkforge.plugins.constants import FP8_KERNEL_SUFFIX, PAGE_SIZE

logger = logging.getLogger(__name__)

WARP_SIZE = 32
FP_FUSION = True
"""Let ptxas fuse multiply-adds (Triton 3.9 default, set explicitly; Triton 3.10 flips the default)."""

KV_CACHE_WRITE_SIGNATURE = {
    "pool_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32",
    "block_table_ptr": "*i64", "positions_ptr": "*i64", "kv_scales_ptr": "*fp32",
    "num_layers": "i32", "batch": "i32", "seq_len": "i32", "num_pages": "i32", "max_pages": "i32",
}  # fmt: skip
PAGED_ATTENTION_SIGNATURE = {  # TensorRT AOT order: input pointers, int32 scalars, output pointers
    "q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32", "pool_ptr": "*fp32",
    "block_table_ptr": "*i64", "prefix_lens_ptr": "*i64", "mask_ptr": "*i1", "kv_scales_ptr": "*fp32",
    "seq_len": "i32", "num_pages": "i32", "max_pages": "i32", "layer": "i32", "out_ptr": "*fp32",
}  # fmt: skip
POOL_POINTERS = {"float32": "*fp32", "float8_e4m3fn": "*fp8e4nv"}
"""Triton pointer type of the page pool by its dtype (the kernels specialise on it)."""
FP8_MIN_ARCH = 89
"""Triton has float8e4nv (E4M3) on sm_89 and later only; fp8-pool kernels are not built for older archs
(TensorRT then runs the ops' ONNX bodies there)."""


def kernel_name(fn_name: str, pool_dtype: str = "float32") -> str:
    """Record name of a kernel for a pool dtype: 'paged_attention_kernel_fp8' for an fp8 pool."""
    return fn_name + (FP8_KERNEL_SUFFIX if pool_dtype != "float32" else "")


def parse_arch(arch: str) -> int:
    """'sm_90' -> 90."""
    match = re.fullmatch(r"sm_(\d+)a?", arch)
    if match is None:
        raise ValueError(f"bad CUDA arch {arch!r}; expected e.g. 'sm_90'")
    return int(match.group(1))


def ptx_isa(ptx: str) -> str:
    """The `.version` directive of a PTX text, e.g. '8.7'."""
    match = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, re.MULTILINE)
    if match is None:
        raise ValueError("PTX has no .version directive")
    return match.group(1)


def ptx_param_count(ptx: str, name: str) -> int:
    """Number of parameters of the `.entry name(...)` in a PTX text."""
    match = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.DOTALL)
    if match is None:
        raise ValueError(f"PTX has no entry {name!r}")
    return match.group(1).count(".param")


def _launch_facts(kernel, signature: dict) -> dict:
    """What a launcher must know beyond the signature.

    Triton appends hidden pointer parameters (global scratch, profile scratch) after the
    signature's arguments; pass null for them when their sizes are 0. Shared memory above 48 KiB
    needs the dynamic shared memory opt-in on the function before launch.
    """
    md = kernel.metadata
    return {
        "num_warps": md.num_warps,
        "block_dim": md.num_warps * WARP_SIZE,
        "shared_mem": md.shared,
        "hidden_params": ptx_param_count(kernel.asm["ptx"], md.name) - len(signature),
        "global_scratch_size": md.global_scratch_size,
        "profile_scratch_size": md.profile_scratch_size,
    }


def _kernels(num_heads: int, kv_heads: int, head_dim: int, page_size: int, scale: float,
             pool_dtype: str = "float32") -> list[tuple]:
    """(jit function, runtime signature, constexprs, grid rule) of every plugin kernel."""
    if pool_dtype not in POOL_POINTERS:
        raise ValueError(f"no kernels for a {pool_dtype!r} pool; pools are {sorted(POOL_POINTERS)}")
    pool = {"pool_ptr": POOL_POINTERS[pool_dtype]}
    return [
        (
            kv_cache_write.kv_cache_write_kernel,
            KV_CACHE_WRITE_SIGNATURE | pool,
            kv_cache_write.launch_config(kv_heads, head_dim, page_size),
            kv_cache_write.GRID_RULE,
        ),
        (
            paged_attention.paged_attention_kernel,
            PAGED_ATTENTION_SIGNATURE | pool,
            paged_attention.launch_config(num_heads, kv_heads, head_dim, page_size, scale),
            paged_attention.GRID_RULE,
        ),
    ]


def compile_kernel(fn, signature: dict, constexprs: dict, arch: str, num_warps: int = 4,
                   name: str | None = None) -> dict:
    """Compile one jit kernel for one arch; returns its record (see module doc), named `name`
    (default: the function's name)."""
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError(f"{fn!r} is not a JITFunction: AOT compile cannot run with TRITON_INTERPRET=1")
    cc = parse_arch(arch)
    full_signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn, full_signature, constexprs)
    try:
        kernel = triton.compile(
            source,
            target=GPUTarget("cuda", cc, WARP_SIZE),
            options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION},
        )
    except Exception as error:  # any backend failure (ptxas, unsupported arch): name what failed
        raise RuntimeError(f"AOT compile of {fn.__name__} for {arch} failed: {error}") from error
    cubin, ptx = kernel.asm["cubin"], kernel.asm["ptx"]
    return {
        "kernel": name or fn.__name__,
        "function_name": kernel.metadata.name,
        "arch": arch,
        "cubin": cubin,
        "ptx": ptx,
        "ptx_isa": ptx_isa(ptx),
        "triton_version": triton.__version__,
        "sha256": hashlib.sha256(cubin).hexdigest(),
        "signature": dict(signature),
        "constexprs": dict(constexprs),
        "enable_fp_fusion": FP_FUSION,
        **_launch_facts(kernel, signature),
    }


def compile_kernels(
    archs: Sequence[str] = ("sm_80", "sm_89", "sm_90"),
    *,
    num_heads: int = 8,
    kv_heads: int = 1,
    head_dim: int = 256,
    page_size: int = PAGE_SIZE,
    scale: float | None = None,
    num_warps: int = 4,
    pool_dtype: str = "float32",
) -> list[dict]:
    """Compile every plugin kernel for every arch, specialised for one model's head layout and
    page pool dtype ("float32" or "float8_e4m3fn": records named `kernel_name(fn, pool_dtype)`).

    `scale` defaults to head_dim ** -0.5. Records are those of `compile_kernel` plus "grid", the
    launch grid rule. Raises RuntimeError naming the kernel and arch on the first failure.
    """
    scale = head_dim**-0.5 if scale is None else scale
    records = []
    for arch in archs:
        if pool_dtype != "float32" and parse_arch(arch) < FP8_MIN_ARCH:
            logger.warning("no %s-pool kernels for %s: Triton has float8e4nv from sm_%d", pool_dtype, arch,
                           FP8_MIN_ARCH)  # fmt: skip
            continue
        for fn, signature, constexprs, grid in _kernels(num_heads, kv_heads, head_dim, page_size, scale,
                                                        pool_dtype):  # fmt: skip
            record = compile_kernel(fn, signature, constexprs, arch, num_warps,
                                    kernel_name(fn.__name__, pool_dtype))
            records.append({**record, "grid": grid})
            logger.info("compiled %s for %s: %d B cubin, PTX ISA %s", record["kernel"], arch,
                        len(record["cubin"]), record["ptx_isa"])  # fmt: skip
    return records
