"""The paged KV cache the runtime owns and every engine shares by reference.

One buffer `[layers, 2, num_pages, page_size, kv_heads, head_dim]` (K at index 0 of dim 1, V at 1)
plus a block table per request. Engines take the buffer as an input; the walk that writes it
(`KVCacheWrite`) has its output bound to the very same buffer, so nothing is copied, ever. The
buffer is float32, or float8_e4m3fn (ml_dtypes, 1 byte per element) for an fp8 cache, whose
per-layer scales come with the bundle.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import numpy_dtype
from walkforge.plugins.constants import FP8_MAX, PAGE_SIZE


@dataclass(frozen=True)
class PoolSpec:
    layers: int
    kv_heads: int
    head_dim: int
    page_size: int = PAGE_SIZE
    dtype: str = "float32"


class KVPagePool:
    """Fixed pool of KV pages with per-request block tables.

    `allocate(request, tokens)` hands out pages for `tokens` positions; `free(request)` returns
    them. Running out raises a WalkforgeError saying how many pages were needed and free.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, page_size: int = PAGE_SIZE,
                 num_pages: int = 256, dtype: str = "float32") -> None:
        if num_pages < 1 or page_size < 1:
            raise WalkforgeError(f"KV pool needs ≥ 1 page of ≥ 1 slot, got {num_pages} × {page_size}")
        self.spec = PoolSpec(layers, kv_heads, head_dim, page_size, dtype)
        self.num_pages = num_pages
        # pool: [L, 2, NP, PS, KVH, D]
        shape = (layers, 2, num_pages, page_size, kv_heads, head_dim)
        self.buffer = np.zeros(shape, dtype=numpy_dtype(dtype))
        self._free = list(range(num_pages))  # a heap: the lowest free pages go out first, so a
        # pool whose requests were all freed hands out exactly what a fresh one would
        self._tables: dict[object, list[int]] = {}

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.spec.page_size)

    def allocate(self, request: object, tokens: int) -> list[int]:
        if request in self._tables:
            raise WalkforgeError(f"request {request!r} already holds KV pages")
        need = self.pages_for(tokens)
        if need > len(self._free):
            raise WalkforgeError(f"KV page pool exhausted: need {need} pages, {len(self._free)} free "
                                 f"of {self.num_pages}")
        self._tables[request] = [heapq.heappop(self._free) for _ in range(need)]
        return list(self._tables[request])

    def free(self, request: object) -> None:
        for page in self._tables.pop(request):
            heapq.heappush(self._free, page)

    def block_table(self, requests: list[object], width: int | None = None) -> np.ndarray:
        """int64 [len(requests), width]: each request's pages, padded with -1."""
        width = width or max((len(self._tables[r]) for r in requests), default=1)
        table = np.full((len(requests), max(width, 1)), -1, dtype=np.int64)
        for row, request in enumerate(requests):
            pages = self._tables[request]
            table[row, : len(pages)] = pages
        return table


def encode_pool(pool: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An fp32 pool [L, 2, ...] as an fp8 (E4M3) pool with per-layer K/V `scales` [L, 2]:
    saturate(x / scale), rounded to nearest even — what KVCacheWrite stores."""
    import ml_dtypes

    s = np.asarray(scales, np.float32).reshape(*scales.shape, *([1] * (pool.ndim - 2)))
    return np.clip(pool / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def decode_pool(pool: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An fp8 pool (float8_e4m3fn, or its uint8 bytes) back to fp32 values: fp8 · scale."""
    import ml_dtypes

    if pool.dtype == np.uint8:
        pool = pool.view(ml_dtypes.float8_e4m3fn)
    s = np.asarray(scales, np.float32).reshape(*scales.shape, *([1] * (pool.ndim - 2)))
    return pool.astype(np.float32) * s
