"""pi0 front: `Pi0Policy.infer` chains vision → prefill → `num_steps` × denoise.

The policy owns one KV page pool. Each call allocates pages for every request's valid prefix
tokens, prefill writes them in place (the pool buffer is bound as both its input and its
output), each denoise step reads them through PagedAttention, and the pages are freed when the
call returns. The pool is never copied; only x_t moves between steps. Its dtype is the engines'
(float32, or float8_e4m3fn for a bundle compiled with `--kv-dtype fp8`); the bundle's per-layer
KV scales are bound on every call (ones for a float32 pool, which ignores them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.runtimes.kv_pool import KVPagePool
from walkforge.runtimes.onnxruntime import to_ortvalue
from walkforge.runtimes.runner import Runner, to_numpy_any

INPUTS = ("images", "image_masks", "prompt_ids", "prompt_mask", "state")


DEFAULT_POOL_REQUESTS = 8  # the default pool holds this many full-length prefixes


def kv_scales(manifest: Mapping[str, Any], layers: int) -> np.ndarray:
    """float32 [layers, 2]: the bundle's calibrated K/V scale per layer, ones where it has none."""
    scales = (manifest.get("kv_cache") or {}).get("scales")
    return np.ones((layers, 2), np.float32) if scales is None else np.asarray(scales, np.float32)


class Pi0Policy(Runner):
    """A compiled pi0 policy. Shapes: images (B, V, 3, 224, 224) float32 in [0, 1].

    `kv_pages` sizes the page pool (default: room for 8 full-length prefixes).
    """

    def __init__(self, *args: Any, kv_pages: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        layers, _, _, page_size, kv_heads, head_dim = self._spec("prefill", "kv_pool").shape
        prefix = int(self.specs("prefill")[0].shape[1]) + self.max_prompt_len  # image + prompt tokens
        pages = kv_pages or DEFAULT_POOL_REQUESTS * -(-prefix // page_size)
        # the engines' pool dtype: the bundle's for ONNX engines, float32 for the torch reference
        dtype = next(s.dtype for s in self.engines["prefill"].inputs if s.name == "kv_pool")
        self.pool = KVPagePool(layers, kv_heads, head_dim, page_size, pages, dtype=dtype)
        self._pool_value = self.pool.buffer if self.backend == "torch" else to_ortvalue(self.pool.buffer)
        self.kv_scales = kv_scales(self.manifest, layers)
        self._requests = 0

    @property
    def num_views(self) -> int:
        return int(self.specs("vision")[0].shape[1])

    @property
    def max_prompt_len(self) -> int:
        return int(self._spec("prefill", "prompt_ids").shape[1])

    def _spec(self, walk: str, name: str):
        return next(s for s in self.specs(walk) if s.name == name)

    def infer(self, images: np.ndarray, image_masks: np.ndarray, prompt_ids: np.ndarray,
              prompt_mask: np.ndarray, state: np.ndarray, noise: np.ndarray | None = None,
              num_steps: int | None = None, seed: int = 0) -> np.ndarray:
        """Sample an action chunk (B, horizon, action_dim). Without `noise`, it is drawn from a
        generator seeded with `seed`, so repeated calls give the same actions."""
        images, image_masks = np.asarray(images), np.asarray(image_masks)
        self._check_views(images)
        prompt_ids, prompt_mask = self._pad_prompt(np.asarray(prompt_ids), np.asarray(prompt_mask))
        feeds = {"images": images, "image_masks": image_masks, "prompt_ids": prompt_ids,
                 "prompt_mask": prompt_mask, "state": np.asarray(state)}
        x_t = self._spec("denoise", "x_t")
        if noise is None:
            batch = images.shape[0]
            rng = np.random.default_rng(seed)
            noise = rng.standard_normal((batch, *x_t.shape[1:])).astype(np.float32)
        feeds["x_t"] = np.asarray(noise)
        self._check(feeds)
        steps = int(num_steps if num_steps is not None else self.manifest["config"]["num_steps"])
        requests = self._allocate(image_masks, prompt_mask)
        try:
            env = dict(feeds, kv_pool=self._pool_value, block_table=self.pool.block_table(requests),
                       kv_scales=self.kv_scales)
            env = self.chain.run(env, {"num_steps": steps})
        finally:
            for request in requests:
                self.pool.free(request)
        return to_numpy_any(env["x_t"])

    def _allocate(self, image_masks: np.ndarray, prompt_mask: np.ndarray) -> list[int]:
        """Pages for each request's valid prefix tokens (256 per unmasked view + prompt)."""
        tokens_per_view = int(self.specs("prefill")[0].shape[1]) // self.num_views
        valid = image_masks.sum(1) * tokens_per_view + prompt_mask.sum(1)
        need = sum(self.pool.pages_for(int(n)) for n in valid)
        if need > self.pool.free_pages:
            raise WalkforgeError(f"KV page pool exhausted: need {need} pages for {len(valid)} requests, "
                                 f"{self.pool.free_pages} free of {self.pool.num_pages} (load with a "
                                 "larger kv_pages)")
        requests = []
        for n in valid:
            self._requests += 1
            requests.append(self._requests)
            self.pool.allocate(self._requests, int(n))
        return requests

    def run(self, feeds: Mapping[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
        missing = [k for k in INPUTS if k not in feeds]
        if missing:
            raise WalkforgeError(f"missing input(s) {', '.join(missing)}; pi0 takes {', '.join(INPUTS)}"
                                 " and optionally noise")
        args = {k: feeds[k] for k in INPUTS}
        return {"actions": self.infer(**args, noise=feeds.get("noise"), **settings)}

    def _check_views(self, images: np.ndarray) -> None:
        if images.ndim == 5 and images.shape[1] != self.num_views:
            raise WalkforgeError(f"images has {images.shape[1]} views, this bundle was compiled "
                                 f"for {self.num_views}")

    def _pad_prompt(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad prompts to the compiled length; refuse longer ones."""
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise WalkforgeError(f"prompt_ids {list(ids.shape)} and prompt_mask {list(mask.shape)} "
                                 "must both be (batch, prompt_len)")
        length, limit = ids.shape[1], self.max_prompt_len
        if length > limit:
            raise WalkforgeError(f"prompt of {length} tokens is longer than the compiled maximum {limit}")
        pad = ((0, 0), (0, limit - length))
        return np.pad(ids, pad), np.pad(mask, pad)

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        dims: dict[str, int] = {}
        specs = {s.name: s for w in ("vision", "prefill", "denoise") for s in self.specs(w)}
        for name, value in feeds.items():
            specs[name].check(value, dims)
        images = feeds["images"]
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise WalkforgeError(f"images must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
        vocab = int(self.manifest["config"]["llm"]["vocab"])
        ids = feeds["prompt_ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise WalkforgeError(f"prompt_ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
