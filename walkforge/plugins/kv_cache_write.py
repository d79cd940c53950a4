"""`walkforge::kv_cache_write` (ONNX `walkforge.KVCacheWrite`): scatter new K/V into the page pool.

Shapes:
    pool         float32 or float8_e4m3fn [L, 2, NP, PS, KVH, D]   (dim 1: 0 = K, 1 = V)
    k, v         float32 [L, B, KVH, S, D]
    block_table  int64   [B, MP]     logical page -> physical page (negative entries read as 0)
    positions    int64   [B, S]      logical position of token s of request b; -1 = skip
    kv_scales    float32 [L, 2]      optional; per-layer K and V scale of an fp8 pool
    -> pool'     the pool's dtype [L, 2, NP, PS, KVH, D]

An fp8 pool stores saturate(k / kv_scales[l, 0]) (and v / kv_scales[l, 1]) rounded to E4M3
(nearest even); a float32 pool stores k and v as they are and ignores kv_scales. In ONNX an fp8
pool travels as its raw bytes (UINT8, see `walkforge.graphs.functions.fp8_kv_pool`): onnxruntime's Gather
and ScatterND do not take float8 tensors.

Token (b, s) at logical position p >= 0 lands in page block_table[b, p // PS], slot p % PS, for
every layer. Skipped tokens write nothing. Two valid tokens must not target the same slot.

The torch op is functional (returns an updated copy: custom ops may not alias inputs). In the
engine the pool is written in place: onnxruntime's ScatterND skips its input copy when IOBinding
binds one buffer as both the pool input and the pool output.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from onnxscript import opset18 as op
from onnxscript import script

from walkforge.plugins._common import (
    WALKFORGE_OPSET,
    case_tensors,
    check_triton_device,
    kernel_scales,
    launch_args,
    pool_scales,
    register_onnx_schema,
)
from walkforge.plugins.aot import AotKernel, eval_grid
from walkforge.plugins.constants import (
    FP8_MAX,
    MAX_HEAD_DIM,
    PLUGIN_NAMESPACE,
    POOL_IN,
    POOL_K,
    POOL_OUT,
    POOL_V,
)
from walkforge.plugins.pool_codec import EncodeUpdates

ONNX_NAME = "KVCacheWrite"
ATTRIBUTES: dict[str, type] = {"plugin_namespace": str, "aot": int}

SCHEMA = register_onnx_schema(
    ONNX_NAME,
    inputs=[(POOL_IN, "P"), ("k", "T"), ("v", "T"), ("block_table", "I"), ("positions", "I"),
            ("kv_scales", "T?")],
    outputs=[(POOL_OUT, "P")],
    attributes=ATTRIBUTES,
    doc=__doc__,
)


def _slots(pool: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor):
    """(b, s, page, slot) index vectors of the tokens that are written, each [N]."""
    page_size = pool.shape[3]
    b, s = torch.nonzero(positions >= 0, as_tuple=True)
    pos = positions[b, s]
    page = block_table.clamp(min=0)[b, pos // page_size]
    return b, s, page, pos % page_size


@torch.library.custom_op("walkforge::kv_cache_write", mutates_args=())
def kv_cache_write(
    pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference: a copy of `pool` with k/v written at their pages (see module doc)."""
    k_scale, v_scale = pool_scales(pool, kv_scales)  # [L, 1, 1, 1, 1] each, or None
    if k_scale is not None:
        k, v = _quantize(k, k_scale), _quantize(v, v_scale)
    out = pool.clone()
    b, s, page, slot = _slots(pool, block_table, positions)
    out[:, POOL_K, page, slot] = k.transpose(2, 3)[:, b, s]  # [L, N, KVH, D]
    out[:, POOL_V, page, slot] = v.transpose(2, 3)[:, b, s]
    return out


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 of x / scale, saturated to +-FP8_MAX, rounded to nearest even."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@kv_cache_write.register_fake
def _(pool, k, v, block_table, positions, kv_scales=None):
    return torch.empty_like(pool)


# ---------------------------------------------------------------- ONNX


def translate(pool, k, v, block_table, positions, kv_scales=None):
    """custom_translation_table entry: one bare `walkforge.KVCacheWrite` node."""
    scales = () if kv_scales is None else (kv_scales,)
    return WALKFORGE_OPSET.KVCacheWrite(
        pool, k, v, block_table, positions, *scales, plugin_namespace=PLUGIN_NAMESPACE, aot=1
    )


@script(WALKFORGE_OPSET, default_opset=op)
def KVCacheWrite(pool, k, v, block_table, positions, kv_scales):  # noqa: N802 (ONNX op name)
    """Function body: valid tokens only (NonZero + Gather), encoded as the pool stores them
    (`pool_codec.EncodeUpdates`), then one ScatterND into the pool.

    Skipped tokens are dropped rather than redirected: redirecting them to any slot (scratch or
    "re-write the old value") can collide with a valid token in the same ScatterND, whose order
    for duplicate indices is unspecified.
    """
    page_size = op.Shape(pool, start=3, end=4)  # [1]
    valid = op.Reshape(op.GreaterOrEqual(positions, op.Constant(value_int=0)), [-1])  # [B*S]
    keep = op.Reshape(op.NonZero(valid), [-1])  # [N]
    pos = op.Max(positions, op.Constant(value_int=0))  # [B, S]
    page = op.GatherElements(op.Max(block_table, op.Constant(value_int=0)), op.Div(pos, page_size), axis=1)
    slot = op.Mod(pos, page_size)
    page_slot = op.Concat(op.Unsqueeze(page, [-1]), op.Unsqueeze(slot, [-1]), axis=-1)  # [B, S, 2]
    page_slot = op.Gather(op.Reshape(page_slot, [-1, 2]), keep, axis=0)  # [N, 2]

    kv = op.Concat(op.Unsqueeze(k, [1]), op.Unsqueeze(v, [1]), axis=1)  # [L, 2, B, KVH, S, D]
    kv = op.Transpose(kv, perm=[0, 1, 2, 4, 3, 5])  # [L, 2, B, S, KVH, D]
    kv = op.Reshape(kv, op.Concat([0, 0, -1], op.Shape(pool, start=4), axis=0))  # [L, 2, B*S, KVH, D]
    updates = EncodeUpdates(op.Gather(kv, keep, axis=2), kv_scales)  # [L, 2, N, KVH, D], the pool's type

    n_layers = op.Shape(pool, start=0, end=1)
    grid = op.Concat(n_layers, [2], op.Shape(keep), [1], axis=0)  # [L, 2, N, 1]
    layer_idx = op.Expand(op.Reshape(op.Range(0, op.Squeeze(n_layers), 1), [-1, 1, 1, 1]), grid)
    kv_idx = op.Expand(op.Reshape(op.Constant(value_ints=[0, 1]), [1, 2, 1, 1]), grid)
    page_slot = op.Expand(op.Unsqueeze(page_slot, [0, 1]), op.Concat(n_layers, [2, 1, 2], axis=0))
    indices = op.Concat(layer_idx, kv_idx, page_slot, axis=-1)  # [L, 2, N, 4]
    return op.ScatterND(pool, indices, updates)


TORCH_OP = torch.ops.walkforge.kv_cache_write.default
BODY = KVCacheWrite
"""The onnxscript body; `pool_codec.function_proto(BODY, opset, ONNX_NAME, pool_dtype)` gives the
FunctionProto for a pool dtype."""


# ---------------------------------------------------------------- Triton


_FP8_MAX = tl.constexpr(FP8_MAX)
_RINT = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + _RINT - _RINT rounds |x| < 2^22 to an integer (ties even)


@triton.jit
def _round_e4m3(x):
    """x (|x| <= FP8_MAX) rounded to the E4M3 grid, nearest even, as float32 (so exactly representable).

    Done by hand because Triton 3.9's interpreter converts float32 -> float8e4nv wrongly (a round-up
    does not carry into the exponent: 124 -> 64; subnormals flush to 0; ties round away); exact
    values it converts correctly. On a GPU the conversion of the rounded value is exact too.
    """
    a = tl.abs(x)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # binade; subnormals: 2^-6's
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)
    r = ((a * inv_step + _RINT) - _RINT) * step
    return tl.where(x < 0, -r, r)  # tiny negatives round to -0, as torch's conversion does


@triton.jit
def kv_cache_write_kernel(
    pool_ptr, k_ptr, v_ptr, block_table_ptr, positions_ptr, kv_scales_ptr,
    num_layers, batch, seq_len, num_pages, max_pages,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (S, B): program (s, b) copies token s of request b into its slot, every layer.

    An fp8 pool (`*fp8e4nv`) stores saturate(x / scale) converted to E4M3; a float32 pool stores
    x and never reads kv_scales_ptr."""
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pos = tl.load(positions_ptr + b * seq_len + s)
    if pos >= 0:
        page = tl.maximum(tl.load(block_table_ptr + b * max_pages + pos // PAGE_SIZE), 0)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < KV_HEADS) & (d < HEAD_DIM)
        for layer in range(num_layers):
            src = (((layer * batch + b) * KV_HEADS + h) * seq_len + s) * HEAD_DIM + d
            dst_k = (((layer * 2 + 0) * num_pages + page) * PAGE_SIZE + pos % PAGE_SIZE) * KV_HEADS + h
            dst_k = dst_k * HEAD_DIM + d
            dst_v = dst_k + num_pages * PAGE_SIZE * KV_HEADS * HEAD_DIM
            k = tl.load(k_ptr + src, mask=mask)
            v = tl.load(v_ptr + src, mask=mask)
            if pool_ptr.dtype.element_ty == tl.float8e4nv:
                k = tl.clamp(tl.div_rn(k, tl.load(kv_scales_ptr + layer * 2)), -_FP8_MAX, _FP8_MAX)
                v = tl.clamp(tl.div_rn(v, tl.load(kv_scales_ptr + layer * 2 + 1)), -_FP8_MAX, _FP8_MAX)
                k, v = _round_e4m3(k), _round_e4m3(v)
            tl.store(pool_ptr + dst_k, k.to(pool_ptr.dtype.element_ty), mask=mask)
            tl.store(pool_ptr + dst_v, v.to(pool_ptr.dtype.element_ty), mask=mask)


def launch_config(kv_heads: int, head_dim: int, page_size: int) -> dict[str, int]:
    """Constexprs of `kv_cache_write_kernel` for a model (shared by the launcher and AOT)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > MAX_HEAD_DIM {MAX_HEAD_DIM}")
    return {
        "KV_HEADS": kv_heads,
        "HEAD_DIM": head_dim,
        "PAGE_SIZE": page_size,
        "BLOCK_H": triton.next_power_of_2(kv_heads),
        "BLOCK_D": triton.next_power_of_2(head_dim),
    }


GRID_RULE = "(S, B, 1): S = k.shape[3], B = k.shape[1]"
SIGNATURE = {
    "pool_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32",
    "block_table_ptr": "*i64", "positions_ptr": "*i64", "kv_scales_ptr": "*fp32",
    "num_layers": "i32", "batch": "i32", "seq_len": "i32", "num_pages": "i32", "max_pages": "i32",
}  # fmt: skip
"""Runtime parameters of `kv_cache_write_kernel`, TensorRT AOT order (the pool pointer is the output too)."""
AOT = AotKernel(kv_cache_write_kernel, SIGNATURE,
                lambda d: launch_config(d.kv_heads, d.head_dim, d.page_size), GRID_RULE)


def scalars(shapes: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The kernel's int32 arguments from the input shapes by name (ints, or TensorRT shape expressions)."""
    k, pool, block_table = shapes["k"], shapes["pool"], shapes["block_table"]  # k: [L, B, KVH, S, D]
    return {"num_layers": k[0], "batch": k[1], "seq_len": k[3], "num_pages": pool[2],
            "max_pages": block_table[1]}


def kernel_args(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                positions: torch.Tensor, kv_scales: torch.Tensor | None = None
                ) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], torch.Tensor]:
    """(`kv_cache_write_kernel` arguments by parameter name, input shapes by name, output): the kernel
    writes into `pool` (contiguous) in place, so the output is `pool`."""
    if not pool.is_contiguous():
        raise ValueError("kv_cache_write_triton writes the pool in place: it must be contiguous")
    tensors = {"pool": pool, "k": k, "v": v, "block_table": block_table, "positions": positions,
               "kv_scales": kernel_scales(pool, kv_scales)}  # fmt: skip
    return *launch_args(tensors, scalars), pool


def case_args(x: Mapping[str, Any], device: str = "cpu") -> tuple:
    """The op's arguments from a plugin case (tests/plugins/plugin_cases.make_inputs) on `device`."""
    return case_tensors(x, ("pool", "k_all", "v_all", "block_table", "positions", "kv_scales"), device)


def kv_cache_write_triton(
    pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton kv write, IN PLACE into `pool` (contiguous); returns `pool`. Shapes as the module doc."""
    args, shapes, _ = kernel_args(pool, k, v, block_table, positions, kv_scales)
    config = launch_config(*pool.shape[4:], pool.shape[3])
    check_triton_device(pool.device)
    kv_cache_write_kernel[eval_grid(GRID_RULE, shapes, config)](**args, **config)
    return pool


# ---------------------------------------------------------------- CUDA dispatch


def _kv_cache_write_cuda(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                         positions: torch.Tensor, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """walkforge::kv_cache_write on CUDA: a copy of `pool` written by the Triton kernel.
    K/V are cast to float32 (bf16 K/V into a float32 pool; an fp8 pool quantises from float32)."""
    out = pool.clone(memory_format=torch.contiguous_format)
    return kv_cache_write_triton(out, k.float(), v.float(), block_table, positions, kv_scales)


def register_cuda() -> None:
    """Dispatch `walkforge::kv_cache_write` on CUDA tensors to the Triton kernel (idempotent);
    CPU tensors keep the eager reference."""
    kv_cache_write.register_kernel("cuda", _kv_cache_write_cuda)


# ---------------------------------------------------------------- TensorRT


def register_trt(record: Mapping[str, Any], ptx: str) -> None:
    """TensorRT plugin `walkforge::KVCacheWrite` running `record`'s AOT kernel: pool' is the pool
    input aliased (written in place)."""
    from walkforge.plugins.trt_plugins import register_aot_plugin

    register_aot_plugin(sys.modules[__name__], record, ptx, lambda descs: descs[POOL_IN].aliased(),
                        lambda shapes, attrs: scalars(shapes))  # fmt: skip
