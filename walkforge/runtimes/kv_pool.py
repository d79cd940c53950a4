"""The paged KV cache the chain owns and every engine shares by reference.

One buffer `[layers, 2, num_pages, page_size, kv_heads, head_dim]` (K at index 0 of dim 1, V at 1)
plus a block table per request. Where the buffer lives is the backend's business
(`allocate_pool(spec)`: host numpy, a device OrtValue, a torch tensor); this module keeps the
page bookkeeping. Engines take the buffer as an input; the walk that writes it (`KVCacheWrite`)
has its output bound to the very same buffer, so nothing is copied, ever. The buffer is float32,
or float8_e4m3fn (1 byte per element) for an fp8 cache, whose per-layer scales come with the bundle.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from walkforge.artifacts.manifest import Manifest
from walkforge.errors import WalkforgeError
from walkforge.plugins.constants import FP8_MAX, PAGE_SIZE, kv_pages

DEFAULT_POOL_REQUESTS = 8
"""A pool sized by default holds this many full-length requests (also TensorRT's opt profile)."""


@dataclass(frozen=True)
class PoolSpec:
    layers: int
    kv_heads: int
    head_dim: int
    page_size: int = PAGE_SIZE
    num_pages: int = 256
    dtype: str = "float32"

    @property
    def shape(self) -> tuple[int, ...]:
        """[L, 2, NP, PS, KVH, D]"""
        return (self.layers, 2, self.num_pages, self.page_size, self.kv_heads, self.head_dim)


class KVPagePool:
    """Page bookkeeping of one pool: which pages each request holds. Thread-safe.

    `allocate(request, tokens)` hands out the lowest free pages for `tokens` positions (a heap: a
    pool whose requests were all freed hands out exactly what a fresh one would); `free(request)`
    returns them. Running out raises a WalkforgeError saying how many pages were needed and free.
    """

    def __init__(self, spec: PoolSpec) -> None:
        if spec.num_pages < 1 or spec.page_size < 1:
            raise WalkforgeError(f"KV pool needs ≥ 1 page of ≥ 1 slot, got {spec.num_pages} × "
                                 f"{spec.page_size}")
        self.spec = spec
        self.num_pages = spec.num_pages
        self._free = list(range(spec.num_pages))
        self._tables: dict[object, list[int]] = {}
        self._lock = threading.Lock()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return kv_pages(tokens, self.spec.page_size)

    def allocate(self, request: object, tokens: int) -> list[int]:
        return self.allocate_all({request: tokens})[request]

    def allocate_all(self, tokens: Mapping[object, int]) -> dict[object, list[int]]:
        """Pages for every request in `tokens` (request -> token count), all or none."""
        with self._lock:
            taken = [r for r in tokens if r in self._tables]
            if taken:
                raise WalkforgeError(f"request {taken[0]!r} already holds KV pages")
            need = sum(self.pages_for(n) for n in tokens.values())
            if need > len(self._free):
                requests = f" for {len(tokens)} requests" if len(tokens) > 1 else ""
                raise WalkforgeError(f"KV page pool exhausted: need {need} pages{requests}, "
                                     f"{len(self._free)} free of {self.num_pages}")
            for request, n in tokens.items():
                self._tables[request] = [heapq.heappop(self._free) for _ in range(self.pages_for(n))]
            return {r: list(self._tables[r]) for r in tokens}

    def free(self, request: object) -> None:
        with self._lock:
            for page in self._tables.pop(request):
                heapq.heappush(self._free, page)

    def block_table(self, requests: Sequence[object], width: int | None = None) -> np.ndarray:
        """int64 [len(requests), width]: each request's pages, padded with -1."""
        with self._lock:
            rows = [self._tables[r] for r in requests]
        width = width or max((len(p) for p in rows), default=1)
        table = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
        for row, pages in enumerate(rows):
            table[row, : len(pages)] = pages
        return table


def kv_scales(manifest: Manifest, layers: int) -> np.ndarray:
    """float32 [layers, 2]: the bundle's calibrated K/V scale per layer, ones where it has none."""
    if manifest.kv_cache is None or manifest.kv_cache.scales is None:
        return np.ones((layers, 2), np.float32)
    return np.asarray(manifest.kv_cache.scales, np.float32)


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
