"""`walkforge::paged_attention` (ONNX `walkforge.PagedAttention`): attend to paged prefix + own suffix.

Shapes:
    q            float32 [B, H, S, D]        RoPE already applied
    k, v         float32 [B, KVH, S, D]      the walk's own (suffix) keys/values
    pool         float32 or float8_e4m3fn [L, 2, NP, PS, KVH, D]
    block_table  int64   [B, MP]             logical page -> physical page (negative entries read as 0)
    prefix_lens  int64   [B]                 request b's prefix = logical positions 0..prefix_lens[b]-1
    suffix_mask  bool    [S, S]              query i may attend suffix key j
    kv_scales    float32 [L, 2]              optional; an fp8 pool reads stored * kv_scales[layer, K|V]
    layer: int, scale: float (attributes)
    -> out       float32 [B, H, S, D]

Softmax (fp32) over [prefix keys < prefix_lens[b]] ++ [suffix keys allowed by suffix_mask].
GQA: query head h reads kv head h // (H // KVH). Masked logits are MASK_FILL (finite), so every
query should see at least one key; a row that sees none is implementation-defined.
A float32 pool ignores kv_scales. In ONNX an fp8 pool travels as UINT8 bytes (see kv_cache_write).
"""

from __future__ import annotations

import math
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
from walkforge.plugins.constants import MASK_FILL, MAX_HEAD_DIM, PLUGIN_NAMESPACE, POOL_IN, POOL_K, POOL_V
from walkforge.plugins.pool_codec import DecodePages

ONNX_NAME = "PagedAttention"
ATTRIBUTES: dict[str, type] = {"layer": int, "scale": float, "plugin_namespace": str, "aot": int}

SCHEMA = register_onnx_schema(
    ONNX_NAME,
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), (POOL_IN, "P"), ("block_table", "I"),
            ("prefix_lens", "I"), ("suffix_mask", "M"), ("kv_scales", "T?")],
    outputs=[("out", "T")],
    attributes=ATTRIBUTES,
    doc=__doc__,
)  # fmt: skip


def _gather_prefix(pool: torch.Tensor, block_table: torch.Tensor, layer: int, kv: int,
                   scale: torch.Tensor | None) -> torch.Tensor:
    """K or V pages of every request, flattened, in float32: [B, KVH, MP * PS, D]."""
    pages = pool[layer, kv][block_table.clamp(min=0)]  # [B, MP, PS, KVH, D]
    if scale is not None:  # fp8 pool: dequantise with this layer's scale
        pages = pages.float() * scale[layer]
    batch, max_pages, page_size, kv_heads, head_dim = pages.shape
    return pages.reshape(batch, max_pages * page_size, kv_heads, head_dim).transpose(1, 2)


@torch.library.custom_op("walkforge::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    suffix_mask: torch.Tensor,
    layer: int,
    scale: float,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference (see module doc); mirrors the ONNX body step for step."""
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    k_scale, v_scale = pool_scales(pool, kv_scales)
    keys = torch.cat([_gather_prefix(pool, block_table, layer, POOL_K, k_scale), k], dim=2)  # [B,KVH,T+S,D]
    values = torch.cat([_gather_prefix(pool, block_table, layer, POOL_V, v_scale), v], dim=2)
    prefix_ok = torch.arange(keys.shape[2] - seq_len) < prefix_lens[:, None]  # [B, T]
    allowed = torch.cat(
        [prefix_ok[:, None, :].expand(-1, seq_len, -1), suffix_mask.expand(batch, -1, -1)], dim=-1
    )  # [B, S, T+S]
    total = keys.shape[2]
    grouped = q.reshape(batch, kv_heads, -1, head_dim)  # [B, KVH, G*S, D]: a group's heads, one matmul
    logits = (grouped @ keys.transpose(-1, -2) * scale).reshape(batch, kv_heads, -1, seq_len, total)
    logits = logits + torch.where(allowed, 0.0, MASK_FILL)[:, None, None]  # = masked_fill, bit for bit
    probs = torch.softmax(logits, dim=-1).reshape(batch, kv_heads, -1, total)
    return (probs @ values).reshape(batch, heads, seq_len, head_dim)


@paged_attention.register_fake
def _(q, k, v, pool, block_table, prefix_lens, suffix_mask, layer, scale, kv_scales=None):
    return torch.empty_like(q)


# ---------------------------------------------------------------- ONNX


def translate(q, k, v, pool, block_table, prefix_lens, suffix_mask, layer: int, scale: float, kv_scales=None):
    """custom_translation_table entry: one bare `walkforge.PagedAttention` node."""
    scales = () if kv_scales is None else (kv_scales,)
    return WALKFORGE_OPSET.PagedAttention(
        q, k, v, pool, block_table, prefix_lens, suffix_mask, *scales,
        layer=layer, scale=scale, plugin_namespace=PLUGIN_NAMESPACE, aot=1,
    )  # fmt: skip


@script(WALKFORGE_OPSET, default_opset=op)
def PagedAttention(q, k, v, pool, block_table, prefix_lens, suffix_mask, kv_scales, layer: int, scale: float):  # noqa: N802
    """Function body; `layer` and `scale` are attribute references, so one body serves every node.
    The request's pages are read as float32 by `pool_codec.DecodePages` (fp8: bytes times the scale).

    Masking uses Where on float logits with a bool condition (onnxruntime CPU has no Where for
    bool *values*; bool conditions are fine) and Concat/Expand of bool tensors.
    """
    layer_idx = op.Constant(value_int=layer)
    k_idx, v_idx = op.Constant(value_int=POOL_K), op.Constant(value_int=POOL_V)
    # The pool as one list of pages [L * 2 * NP, PS, KVH, D] (a Reshape: no copy), read at
    # (layer, K|V, page) by one Gather: only the request's pages are copied. Gathering the layer
    # first copied all of it, and onnxruntime fused those Gathers into a Split that copied the
    # whole pool on every denoise step.
    pool_pages = op.Reshape(pool, op.Concat([-1], op.Shape(pool, start=3), axis=0))
    num_pages = op.Shape(pool, start=2, end=3)  # [1] = NP
    first_k = op.Mul(op.Add(op.Mul(layer_idx, op.Constant(value_int=2)), k_idx), num_pages)
    first_v = op.Mul(op.Add(op.Mul(layer_idx, op.Constant(value_int=2)), v_idx), num_pages)
    pages = op.Max(block_table, op.Constant(value_int=0))
    kv_d = op.Shape(pool, start=4)  # [KVH, D]
    flat = op.Concat(op.Shape(block_table, start=0, end=1), [-1], kv_d, axis=0)  # [B, -1, KVH, D]
    k_pages = op.Gather(pool_pages, op.Add(pages, first_k), axis=0)  # [B, MP, PS, KVH, D]
    v_pages = op.Gather(pool_pages, op.Add(pages, first_v), axis=0)
    k_pages = DecodePages(k_pages, kv_scales, layer_idx, k_idx)  # float32
    v_pages = DecodePages(v_pages, kv_scales, layer_idx, v_idx)
    k_pre = op.Transpose(op.Reshape(k_pages, flat), perm=[0, 2, 1, 3])  # [B, KVH, T, D]
    v_pre = op.Transpose(op.Reshape(v_pages, flat), perm=[0, 2, 1, 3])
    keys = op.Concat(k_pre, k, axis=2)  # [B, KVH, T+S, D]
    values = op.Concat(v_pre, v, axis=2)

    q_shape = op.Shape(q)  # [B, H, S, D]
    kv_shape = op.Shape(k, start=0, end=2)  # [B, KVH]
    seq = op.Shape(q, start=2, end=3)  # [1]
    total = op.Shape(keys, start=2, end=3)  # [1] = T+S
    # A group's G query heads as one [G*S, D] matmul against their K/V head (transposed K: fused).
    grouped = op.Reshape(q, op.Concat(kv_shape, [-1], op.Shape(q, start=3), axis=0))  # [B, KVH, G*S, D]
    logits = op.Mul(op.MatMul(grouped, op.Transpose(keys, perm=[0, 1, 3, 2])), op.Constant(value_float=scale))
    logits = op.Reshape(logits, op.Concat(kv_shape, [-1], seq, total, axis=0))  # [B, KVH, G, S, T+S]

    n_prefix = op.Shape(k_pre, start=2, end=3)  # [1] = MP * PS
    prefix_ok = op.Less(op.Range(0, op.Squeeze(n_prefix), 1), op.Unsqueeze(prefix_lens, [1]))  # [B, T]
    batch = op.Shape(q, start=0, end=1)
    prefix_ok = op.Expand(op.Unsqueeze(prefix_ok, [1]), op.Concat(batch, seq, n_prefix, axis=0))
    suffix_ok = op.Expand(op.Unsqueeze(suffix_mask, [0]), op.Concat(batch, seq, seq, axis=0))
    allowed = op.Unsqueeze(op.Concat(prefix_ok, suffix_ok, axis=-1), [1, 2])  # [B, 1, 1, S, T+S]
    # masked_fill as an added 0 / MASK_FILL bias (equal bit for bit; blocks.gemma.mask_bias).
    bias = op.Where(allowed, op.Constant(value_float=0.0), op.Constant(value_float=MASK_FILL))
    probs = op.Softmax(op.Add(logits, bias), axis=-1)
    probs = op.Reshape(probs, op.Concat(kv_shape, [-1], total, axis=0))  # [B, KVH, G*S, T+S]
    return op.Reshape(op.MatMul(probs, values), q_shape)  # [B, KVH, G*S, D] -> [B, H, S, D]


TORCH_OP = torch.ops.walkforge.paged_attention.default
BODY = PagedAttention
"""The onnxscript body; `pool_codec.function_proto(BODY, opset, ONNX_NAME, pool_dtype)` gives the
FunctionProto for a pool dtype."""


# ---------------------------------------------------------------- Triton


@triton.jit
def _online_softmax_step(acc, m_i, l_i, logits, values):
    """Fold one key block into the running (acc [M, D], max [M], sum [M]); logits [M, N], values [N, D]."""
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, pool_ptr, block_table_ptr, prefix_lens_ptr, mask_ptr, kv_scales_ptr,
    seq_len, num_pages, max_pages, layer, out_ptr,
    NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    SCALE: tl.constexpr, FILL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(S, BLOCK_M), H, B): BLOCK_M queries of one head; prefix pages, then the suffix.

    An fp8 pool (`*fp8e4nv`) is read as float32 times the layer's K / V scale; a float32 pool
    never reads kv_scales_ptr."""
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1)
    kvh = h // (NUM_HEADS // KV_HEADS)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # query index [M]
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    q_off = ((b * NUM_HEADS + h) * seq_len + rows[:, None]) * HEAD_DIM + d[None, :]
    q_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_prefix = tl.load(prefix_lens_ptr + b)
    v_shift = num_pages * PAGE_SIZE * KV_HEADS * HEAD_DIM
    k_scale = 1.0
    v_scale = 1.0
    if pool_ptr.dtype.element_ty == tl.float8e4nv:
        k_scale = tl.load(kv_scales_ptr + layer * 2)
        v_scale = tl.load(kv_scales_ptr + layer * 2 + 1)
    for start in range(0, n_prefix, BLOCK_N):  # prefix: BLOCK_N logical positions, any pages
        t = start + tl.arange(0, BLOCK_N)
        t_ok = t < n_prefix
        page = tl.load(block_table_ptr + b * max_pages + t // PAGE_SIZE, mask=t_ok, other=0)
        slot = ((layer * 2 * num_pages + tl.maximum(page, 0)) * PAGE_SIZE + t % PAGE_SIZE) * KV_HEADS + kvh
        kv_off = slot[:, None] * HEAD_DIM + d[None, :]
        kv_mask = t_ok[:, None] & (d[None, :] < HEAD_DIM)
        keys = tl.load(pool_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32) * k_scale
        values = tl.load(pool_ptr + v_shift + kv_off, mask=kv_mask, other=0.0).to(tl.float32) * v_scale
        logits = tl.dot(q, tl.trans(keys), input_precision="ieee") * SCALE
        logits = tl.where(t_ok[None, :], logits, FILL)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, logits, values)

    for start in range(0, seq_len, BLOCK_N):  # suffix: own keys under suffix_mask
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < seq_len
        kv_off = ((b * KV_HEADS + kvh) * seq_len + j[:, None]) * HEAD_DIM + d[None, :]
        kv_mask = j_ok[:, None] & (d[None, :] < HEAD_DIM)
        keys = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        values = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        allowed = tl.load(mask_ptr + rows[:, None] * seq_len + j[None, :],
                          mask=row_ok[:, None] & j_ok[None, :], other=0)  # fmt: skip
        logits = tl.dot(q, tl.trans(keys), input_precision="ieee") * SCALE
        logits = tl.where(allowed != 0, logits, FILL)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, logits, values)

    tl.store(out_ptr + q_off, acc / l_i[:, None], mask=q_mask)


def launch_config(num_heads: int, kv_heads: int, head_dim: int, page_size: int, scale: float) -> dict:
    """Constexprs of `paged_attention_kernel` for a model (shared by the launcher and AOT).

    `scale` is a constexpr because TensorRT AOT plugins pass only int32 scalars to a kernel.
    """
    if head_dim > MAX_HEAD_DIM or num_heads % kv_heads:
        problem = f"{head_dim=} (max {MAX_HEAD_DIM}), {num_heads=}, {kv_heads=} (must divide heads)"
        raise ValueError(f"unsupported paged attention shape: {problem}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    return {
        "NUM_HEADS": num_heads, "KV_HEADS": kv_heads, "HEAD_DIM": head_dim, "PAGE_SIZE": page_size,
        "SCALE": float(scale), "FILL": MASK_FILL,
        "BLOCK_M": 16, "BLOCK_N": 16 if block_d > 128 else 32, "BLOCK_D": block_d,
    }  # fmt: skip


GRID_RULE = "(cdiv(S, BLOCK_M), H, B): S = q.shape[2], H = q.shape[1], B = q.shape[0]"
SIGNATURE = {  # TensorRT AOT order: input pointers, int32 scalars, output pointers
    "q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32", "pool_ptr": "*fp32",
    "block_table_ptr": "*i64", "prefix_lens_ptr": "*i64", "mask_ptr": "*i1", "kv_scales_ptr": "*fp32",
    "seq_len": "i32", "num_pages": "i32", "max_pages": "i32", "layer": "i32", "out_ptr": "*fp32",
}  # fmt: skip
"""Runtime parameters of `paged_attention_kernel`."""
AOT = AotKernel(paged_attention_kernel, SIGNATURE,
                lambda d: launch_config(d.num_heads, d.kv_heads, d.head_dim, d.page_size, d.scale), GRID_RULE)


def scalars(shapes: Mapping[str, Sequence[Any]], layer: Any) -> dict[str, Any]:
    """The kernel's int32 arguments from the input shapes by name (ints, or TensorRT shape expressions)."""
    return {"seq_len": shapes["q"][2], "num_pages": shapes["pool"][2], "max_pages": shapes["block_table"][1],
            "layer": layer}  # fmt: skip


def kernel_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor,
                block_table: torch.Tensor, prefix_lens: torch.Tensor, suffix_mask: torch.Tensor, layer: int,
                scale: float, kv_scales: torch.Tensor | None = None
                ) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], torch.Tensor]:
    """(`paged_attention_kernel` arguments by parameter name, input shapes by name, the new output
    [B, H, S, D]); `scale` is the kernel's constexpr, not an argument."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    tensors = {"q": q, "k": k, "v": v, "pool": pool, "block_table": block_table, "prefix_lens": prefix_lens,
               "mask": suffix_mask, "kv_scales": kernel_scales(pool, kv_scales)}  # fmt: skip
    args, shapes = launch_args(tensors, lambda shapes: scalars(shapes, layer))
    return args | {"out_ptr": out}, shapes, out


def case_args(x: Mapping[str, Any], device: str = "cpu") -> tuple:
    """The op's arguments from a plugin case (tests/plugins/plugin_cases.make_inputs) on `device`:
    layer `x["layer"]`'s own K/V."""
    layer = x["layer"]
    q, pool, block_table, prefix_lens, suffix_mask, kv_scales = case_tensors(
        x, ("q", "pool", "block_table", "prefix_lens", "suffix_mask", "kv_scales"), device)
    k, v = (x[name][layer].to(device) for name in ("k_all", "v_all"))
    return q, k, v, pool, block_table, prefix_lens, suffix_mask, layer, x["scale"], kv_scales


def paged_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    suffix_mask: torch.Tensor,
    layer: int,
    scale: float,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton paged attention; same contract as `paged_attention`. Returns a new [B, H, S, D]."""
    args, shapes, out = kernel_args(q, k, v, pool, block_table, prefix_lens, suffix_mask, layer, scale,
                                    kv_scales)  # fmt: skip
    config = launch_config(q.shape[1], k.shape[1], q.shape[3], pool.shape[3], scale)
    check_triton_device(q.device)
    paged_attention_kernel[eval_grid(GRID_RULE, shapes, config)](**args, **config)
    return out


# ---------------------------------------------------------------- CUDA dispatch


def _paged_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor,
                          block_table: torch.Tensor, prefix_lens: torch.Tensor, suffix_mask: torch.Tensor,
                          layer: int, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """walkforge::paged_attention on CUDA: the Triton kernel in float32 over a float32 or fp8 pool,
    returned in q's dtype."""
    out = paged_attention_triton(q.float(), k.float(), v.float(), pool, block_table, prefix_lens,
                                 suffix_mask, layer, scale, kv_scales)  # fmt: skip
    return out.to(q.dtype)


def register_cuda() -> None:
    """Dispatch `walkforge::paged_attention` on CUDA tensors to the Triton kernel (idempotent);
    CPU tensors keep the eager reference."""
    paged_attention.register_kernel("cuda", _paged_attention_cuda)


# ---------------------------------------------------------------- TensorRT


def register_trt(record: Mapping[str, Any], ptx: str) -> None:
    """TensorRT plugin `walkforge::PagedAttention` running `record`'s AOT kernel: out is like q.
    The node's `scale` must be the one the kernel was compiled with (a constexpr)."""
    from walkforge.plugins.trt_plugins import register_aot_plugin

    compiled = record["constexprs"]["SCALE"]

    def kernel_scalars(shapes: Mapping[str, Sequence[Any]], attrs: Mapping[str, Any]) -> dict[str, Any]:
        if not math.isclose(attrs["scale"], compiled, rel_tol=1e-6):
            raise ValueError(f"node scale {attrs['scale']} != kernel SCALE {compiled} (recompile kernels)")
        return scalars(shapes, attrs["layer"])

    register_aot_plugin(sys.modules[__name__], record, ptx, lambda descs: descs["q"].like(), kernel_scalars)
