"""Random inputs for the plugin ops and an independent dense torch reference (float64, per request).

Imported by the plugin tests and by the Triton-interpreter subprocess script.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from tolerances import attention_tol

from walkforge.plugins.constants import FP8_MAX

LAYERS = 2
HEADS = 4
BATCHES = {1: [17], 4: [1, 17, 33, 0]}  # batch size -> prefix lengths (not page multiples, one empty)


@dataclass(frozen=True)
class Case:
    page_size: int
    kv_heads: int
    head_dim: int
    seq: int
    batch: int

    @property
    def id(self) -> str:
        return f"ps{self.page_size}-kvh{self.kv_heads}-d{self.head_dim}-s{self.seq}-b{self.batch}"


def case_tol(case: Case) -> float:
    """Relative tolerance of two fp32 attentions on `case`: logits sum head_dim terms, outputs sum
    up to the longest prefix + seq keys: 1.8e-5 at d256 (measured ≤ 1.6e-6), 1/600 of an fp8 rounding."""
    return attention_tol(case.head_dim, max(BATCHES[case.batch]) + case.seq)


ALL_CASES = [Case(*c) for c in itertools.product((8, 16), (1, 2), (16, 256), (1, 51), (1, 4))]


def block_causal_mask(block_sizes: list[int]) -> torch.Tensor:
    """[S, S] bool: token i sees token j iff j's block starts no later than i's block (pi0 suffix style)."""
    block = torch.repeat_interleave(torch.arange(len(block_sizes)), torch.tensor(block_sizes))
    return block[None, :] <= block[:, None]


def make_inputs(case: Case, seed: int = 0) -> dict:
    """Pool with random content, shuffled pages per request (padded with -1), q/k/v, masks.

    Positions append the suffix after each prefix, skipping the last suffix token of request 0.
    """
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.tensor(BATCHES[case.batch])
    max_pages = -(-(int(prefix.max()) + case.seq) // case.page_size) + 1
    num_pages = case.batch * max_pages + 3
    perm = torch.randperm(num_pages, generator=gen)[: case.batch * max_pages].reshape(case.batch, max_pages)
    used = -(-(prefix + case.seq) // case.page_size)
    block_table = torch.where(torch.arange(max_pages) < used[:, None], perm, -1)
    positions = prefix[:, None] + torch.arange(case.seq)
    positions[0, -1] = -1

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    kv, hd, s, b = case.kv_heads, case.head_dim, case.seq, case.batch
    pool, k_all, v_all = randn(LAYERS, 2, num_pages, case.page_size, kv, hd), randn(LAYERS, b, kv, s, hd), \
        randn(LAYERS, b, kv, s, hd)
    v_all, pool[:, 1] = v_all * 3, pool[:, 1] * 3  # V on another scale than K
    amax = torch.stack([k_all.abs().amax(dim=(1, 2, 3, 4)), v_all.abs().amax(dim=(1, 2, 3, 4))], dim=1)
    amax = torch.maximum(amax, pool.abs().amax(dim=(2, 3, 4, 5)))  # [L, 2]: what calibration would see
    return {
        "pool": pool,
        "q": randn(b, HEADS, s, hd),
        "k_all": k_all,
        "v_all": v_all,
        "kv_scales": amax / FP8_MAX,  # [L, 2] as calibration gives them: amax / 448
        "block_table": block_table,
        "positions": positions,
        "prefix_lens": prefix,
        "suffix_mask": block_causal_mask([1, s - 1] if s > 1 else [1]),
        "layer": 1,
        "scale": hd**-0.5,
    }


def fp8_pool(pool: torch.Tensor, kv_scales: torch.Tensor) -> torch.Tensor:
    """An fp8 pool holding `pool` quantised with kv_scales [L, 2]: float8_e4m3fn, 1 byte/element."""
    scaled = pool.double() / kv_scales.double().reshape(-1, 2, 1, 1, 1, 1)
    return scaled.clamp(-FP8_MAX, FP8_MAX).float().to(torch.float8_e4m3fn)


def dequantize(pool: torch.Tensor, kv_scales: torch.Tensor) -> torch.Tensor:
    """float64 values of an fp8 pool."""
    return pool.double() * kv_scales.double().reshape(-1, 2, 1, 1, 1, 1)


def dense_kv_write(pool, k, v, block_table, positions) -> torch.Tensor:
    """Loop reference for kv_cache_write: [L, 2, NP, PS, KVH, D]."""
    out = pool.clone()
    page_size = pool.shape[3]
    for b, s in itertools.product(*map(range, positions.shape)):
        p = int(positions[b, s])
        if p >= 0:
            page = int(block_table[b, p // page_size])
            out[:, 0, page, p % page_size] = k[:, b, :, s]
            out[:, 1, page, p % page_size] = v[:, b, :, s]
    return out


def dense_prefix(pool, block_table, layer: int, b: int, length: int, kv: int) -> torch.Tensor:
    """K (kv=0) or V (kv=1) of request b's first `length` positions: [KVH, length, D]."""
    pages = [pool[layer, kv, int(page)] for page in block_table[b] if page >= 0]
    dense = torch.cat(pages) if pages else pool[layer, kv, :0, 0]  # [n * PS, KVH, D]
    return dense[:length].transpose(0, 1)


def dense_attention(q, k, v, pool, block_table, prefix_lens, suffix_mask, layer, scale) -> torch.Tensor:
    """Per-request float64 reference for paged_attention: [B, H, S, D]."""
    q, k, v, pool = (t.double() for t in (q, k, v, pool))
    group = q.shape[1] // k.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = int(prefix_lens[b])
        keys = torch.cat([dense_prefix(pool, block_table, layer, b, n, 0), k[b]], dim=1)  # [KVH, n+S, D]
        values = torch.cat([dense_prefix(pool, block_table, layer, b, n, 1), v[b]], dim=1)
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [H, n+S, D]
        visible = torch.cat([torch.ones(q.shape[2], n, dtype=torch.bool), suffix_mask], dim=1)
        logits = (q[b] @ keys.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        outs.append(torch.softmax(logits, dim=-1) @ values)
    return torch.stack(outs).float()
