"""`walkforge::kv_cache_write` (ONNX `walkforge.KVCacheWrite`): scatter new K/V into the page pool.

Shapes:
    pool         float32 [L, 2, NP, PS, KVH, D]   (dim 1: 0 = K, 1 = V)
    k, v         float32 [L, B, KVH, S, D]
    block_table  int64   [B, MP]     logical page -> physical page (negative entries read as 0)
    positions    int64   [B, S]      logical position of token s of request b; -1 = skip
    -> pool'     float32 [L, 2, NP, PS, KVH, D]

Token (b, s) at logical position p >= 0 lands in page block_table[b, p // PS], slot p % PS, for
every layer. Skipped tokens write nothing. Two valid tokens must not target the same slot.

The torch op is functional (returns an updated copy: custom ops may not alias inputs). In the
engine the pool is written in place: onnxruntime's ScatterND skips its input copy when IOBinding
binds one buffer as both the pool input and the pool output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from onnxscript import opset18 as op
from onnxscript import script

from walkforge.plugins._common import WALKFORGE_OPSET, check_triton_device, register_onnx_schema
from walkforge.plugins.constants import MAX_HEAD_DIM, PLUGIN_NAMESPACE, POOL_K, POOL_V

ONNX_NAME = "KVCacheWrite"
ATTRIBUTES: dict[str, type] = {"plugin_namespace": str, "aot": int}

SCHEMA = register_onnx_schema(
    ONNX_NAME,
    inputs=[("pool", "T"), ("k", "T"), ("v", "T"), ("block_table", "I"), ("positions", "I")],
    outputs=[("pool_out", "T")],
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
) -> torch.Tensor:
    """Eager reference: a copy of `pool` with k/v written at their pages (see module doc)."""
    out = pool.clone()
    b, s, page, slot = _slots(pool, block_table, positions)
    out[:, POOL_K, page, slot] = k.transpose(2, 3)[:, b, s]  # [L, N, KVH, D]
    out[:, POOL_V, page, slot] = v.transpose(2, 3)[:, b, s]
    return out


@kv_cache_write.register_fake
def _(pool, k, v, block_table, positions):
    return torch.empty_like(pool)


# ---------------------------------------------------------------- ONNX


def translate(pool, k, v, block_table, positions):
    """custom_translation_table entry: one bare `walkforge.KVCacheWrite` node."""
    return WALKFORGE_OPSET.KVCacheWrite(
        pool, k, v, block_table, positions, plugin_namespace=PLUGIN_NAMESPACE, aot=1
    )


@script(WALKFORGE_OPSET, default_opset=op)
def KVCacheWrite(pool, k, v, block_table, positions):  # noqa: N802 (ONNX op name)
    """Function body: valid tokens only (NonZero + Gather), then one ScatterND into the pool.

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
    updates = op.Gather(kv, keep, axis=2)  # [L, 2, N, KVH, D]

    n_layers = op.Shape(pool, start=0, end=1)
    grid = op.Concat(n_layers, [2], op.Shape(keep), [1], axis=0)  # [L, 2, N, 1]
    layer_idx = op.Expand(op.Reshape(op.Range(0, op.Squeeze(n_layers), 1), [-1, 1, 1, 1]), grid)
    kv_idx = op.Expand(op.Reshape(op.Constant(value_ints=[0, 1]), [1, 2, 1, 1]), grid)
    page_slot = op.Expand(op.Unsqueeze(page_slot, [0, 1]), op.Concat(n_layers, [2, 1, 2], axis=0))
    indices = op.Concat(layer_idx, kv_idx, page_slot, axis=-1)  # [L, 2, N, 4]
    return op.ScatterND(pool, indices, updates)


TORCH_OP = torch.ops.walkforge.kv_cache_write.default
FUNCTION = KVCacheWrite
"""The onnxscript body; `_common.function_proto(FUNCTION, opset)` gives the FunctionProto."""


# ---------------------------------------------------------------- Triton


@triton.jit
def kv_cache_write_kernel(
    pool_ptr, k_ptr, v_ptr, block_table_ptr, positions_ptr,
    num_layers, batch, seq_len, num_pages, max_pages,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (S, B): program (s, b) copies token s of request b into its slot, every layer."""
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
            tl.store(pool_ptr + dst_k, tl.load(k_ptr + src, mask=mask), mask=mask)
            tl.store(pool_ptr + dst_v, tl.load(v_ptr + src, mask=mask), mask=mask)


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


def kv_cache_write_triton(
    pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Triton kv write, IN PLACE into `pool` (contiguous); returns `pool`. Shapes as the module doc."""
    n_layers, _, num_pages, page_size, kv_heads, head_dim = pool.shape
    batch, seq_len = positions.shape
    tensors = [t.contiguous() for t in (k, v, block_table, positions)]
    check_triton_device(pool.device)
    kv_cache_write_kernel[(seq_len, batch, 1)](
        pool, *tensors, n_layers, batch, seq_len, num_pages, block_table.shape[1],
        **launch_config(kv_heads, head_dim, page_size),
    )  # fmt: skip
    return pool
