"""Paged vs dense attention on pi0's shapes: the recipe's `PagedCache.attend` (the paged_attention op,
on CUDA its Triton kernel) against `DenseCache.attend` (the dense eager path `sample_actions` uses)
over the same prefix K/V, for batch 1 to 8. Parity is asserted; the median times (CUDA events) and
the kernel's achieved bandwidth go to the run's "gpu timings" summary.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from plugin_cases import block_causal_mask
from tolerances import attention_tol, rel_err

HEADS, KV_HEADS, HEAD_DIM, SEQ = 8, 1, 256, 51
"""pi0's action expert attending to the VLM's K/V: 8 query heads, 1 KV head, 51 suffix tokens."""
PREFIX = 816  # 3 camera views x 256 patches + 48 prompt tokens
SHORT = 600  # odd requests hold fewer valid tokens, so padding is masked on both sides
BATCHES = (1, 2, 4, 8)
TOL = attention_tol(HEAD_DIM, PREFIX + SEQ)  # both sides fp32 (TF32 off), summed in other orders


def pi0_caches(batch: int, seed: int = 0) -> dict:
    """The same prefix K/V held both ways, CPU float32: dense [1, B, KVH, P, D] with a mask [B, P],
    and written by the eager kv_cache_write into a pool of shuffled pages; plus the suffix's
    q [B, H, S, D], k/v [B, KVH, S, D] and its block-causal mask (state token, then actions)."""
    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins.constants import PAGE_SIZE, kv_pages

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    lens = torch.tensor([SHORT if b % 2 else PREFIX for b in range(batch)])
    mask = torch.arange(PREFIX) < lens[:, None]  # [B, P]
    pages = kv_pages(PREFIX)
    num_pages = batch * pages + 1
    block_table = torch.randperm(num_pages, generator=gen)[: batch * pages].reshape(batch, pages)
    k, v = randn(1, batch, KV_HEADS, PREFIX, HEAD_DIM), randn(1, batch, KV_HEADS, PREFIX, HEAD_DIM)
    empty = torch.zeros(1, 2, num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM)
    pool = kvw.kv_cache_write(empty, k, v, block_table, torch.where(mask, torch.arange(PREFIX), -1))
    return {"dense": (k, v, mask), "paged": (pool, block_table, lens, torch.ones(1, 2)),
            "suffix": (randn(batch, HEADS, SEQ, HEAD_DIM), randn(batch, KV_HEADS, SEQ, HEAD_DIM),
                       randn(batch, KV_HEADS, SEQ, HEAD_DIM), block_causal_mask([1, SEQ - 1]))}  # fmt: skip


def attends(caches: dict, device: str) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(paged, dense): layer 0's attention through PagedCache and DenseCache on `device`."""
    from walkforge.recipes.blocks.flow import DenseCache, PagedCache

    paged = PagedCache(*(t.to(device) for t in caches["paged"]))
    dense = DenseCache(*(t.to(device) for t in caches["dense"]))
    suffix = [t.to(device) for t in caches["suffix"]]
    return (lambda: paged.attend(0, *suffix)), (lambda: dense.attend(0, *suffix))


def paged_attention_bytes(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int,
                          prefix_tokens: int, itemsize: int = 4) -> int:
    """Bytes one paged_attention call must move at least: the prefix K and V pages of every
    request (`prefix_tokens` summed over the batch), the suffix K/V and q read, out written."""
    kv_pages = 2 * prefix_tokens * kv_heads * head_dim
    suffix_kv = 2 * batch * kv_heads * seq * head_dim
    q_and_out = 2 * batch * heads * seq * head_dim
    return (kv_pages + suffix_kv + q_and_out) * itemsize


def cuda_time_ms(fn: Callable[[], object], warmup: int = 10, iters: int = 100) -> float:
    """Median per-call time of `fn` in ms, from CUDA events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", BATCHES)
def test_paged_attention_matches_the_dense_cache_on_pi0_shapes(batch, timings, monkeypatch):
    from walkforge.plugins import register_cuda_kernels

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the dense side stays fp32
    register_cuda_kernels()  # PagedCache's op on CUDA tensors: the Triton kernel
    caches = pi0_caches(batch, seed=batch)
    paged, dense = attends(caches, "cuda")
    assert rel_err(paged(), dense()) <= TOL
    paged_ms, dense_ms = cuda_time_ms(paged), cuda_time_ms(dense)
    nbytes = paged_attention_bytes(batch, HEADS, KV_HEADS, SEQ, HEAD_DIM, int(caches["paged"][2].sum()))
    timings.append(f"paged attention B={batch} (prefix {PREFIX}/{SHORT}, 8 heads, d256): Triton "
                   f"{paged_ms:.3f} ms, {nbytes / paged_ms / 1e6:.0f} GB/s; dense eager {dense_ms:.3f} ms "
                   f"({dense_ms / paged_ms:.2f}x)")  # fmt: skip


def test_paged_and_dense_caches_agree_on_cpu():
    """The two sides of the GPU test hold the same K/V: on CPU both are eager references."""
    paged, dense = attends(pi0_caches(2), "cpu")
    assert rel_err(paged(), dense()) <= TOL


def test_paged_attention_bytes_counts_pages_suffix_q_and_out():
    # 816 prefix tokens x 1 KV head x 256 x (K, V); suffix K/V 51 tokens; q and out 8 heads x 51
    expected = (2 * 816 * 256 + 2 * 51 * 256 + 2 * 8 * 51 * 256) * 4
    assert paged_attention_bytes(1, 8, 1, 51, 256, 816) == expected
    assert paged_attention_bytes(4, 8, 1, 51, 256, 4 * 816) == 4 * expected
