"""pi0.5's walks, the run-time inputs of its front, and what its plugin kernels are built for.

A request is three walks; vision and prefill are pi0's (the same modules, the same contracts):

    vision   images [B, V, 3, 224, 224] in [0, 1]  → image tokens [B, V·256, D_llm]
    prefill  image tokens + prompt (with the state) → per-layer prefix K/V (the KV cache)
    denoise  x_t, t + the cache                    → x_{t+dt}, run num_steps times (Euler)
"""

from __future__ import annotations

import numpy as np
import torch

from walkforge.graphs.walk import Sequential, TensorSpec
from walkforge.plugins.constants import PAGE_SIZE, kv_pages
from walkforge.recipes.pi0.walks import TORCH_POOL_DTYPES, _Walk, chain_walks, kernel_shapes, prefix_inputs
from walkforge.recipes.pi05.config import ACTION_HEADS, Pi05Config
from walkforge.recipes.pi05.model import PagedCache, Pi05Model

__all__ = ["DenoiseWalk", "fake_inputs", "kernel_shapes", "walks"]


def fake_inputs(cfg: Pi05Config, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid run-time inputs (Pi05Policy's, `noise` = the initial x_t). Request 0's last camera
    is masked off (when V > 1) and prompt lengths differ per request (right-padded with id 0)."""
    rng = np.random.default_rng(seed)
    return {
        **prefix_inputs(cfg, batch, rng),
        "noise": rng.standard_normal((batch, cfg.action_horizon, cfg.action_dim)).astype(np.float32),
    }


class DenoiseWalk(Pi05Model):
    """The expert and its action/time heads, held as pi0's walks hold their parts (pi0's
    `_Walk.__init__`), running Pi05Model's methods."""

    parts = ("expert", *ACTION_HEADS)
    __init__ = _Walk.__init__

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, kv_pool: torch.Tensor,
                block_table: torch.Tensor, prefix_lens: torch.Tensor, kv_scales: torch.Tensor
                ) -> torch.Tensor:
        return self.denoise_step(x_t, t, dt, PagedCache(kv_pool, block_table, prefix_lens, kv_scales))


def _specs(cfg: Pi05Config, kv_dtype: str) -> dict[str, TensorSpec]:
    b, v, s = "batch", cfg.num_views, cfg.vision.image_size
    pool = (cfg.llm.layers, 2, "num_pages", PAGE_SIZE, cfg.llm.kv_heads, cfg.llm.head_dim)
    actions = (b, cfg.action_horizon, cfg.action_dim)
    return {x.name: x for x in (
        TensorSpec("images", "float32", (b, v, 3, s, s)),
        TensorSpec("image_tokens", "float32", (b, v * cfg.vision.tokens, cfg.llm.width)),
        TensorSpec("image_masks", "bool", (b, v)),
        TensorSpec("prompt_ids", "int64", (b, cfg.max_prompt_len)),
        TensorSpec("prompt_mask", "bool", (b, cfg.max_prompt_len)),
        TensorSpec("kv_pool", kv_dtype, pool), TensorSpec("kv_pool_out", kv_dtype, pool),
        TensorSpec("kv_scales", "float32", (cfg.llm.layers, 2)),
        TensorSpec("block_table", "int64", (b, "max_pages")), TensorSpec("prefix_lens", "int64", (b,)),
        TensorSpec("x_t", "float32", actions), TensorSpec("t", "float32", (b,)),
        TensorSpec("dt", "float32", (1,)), TensorSpec("x_next", "float32", actions),
    )}


def walks(model: Pi05Model, cfg: Pi05Config, kv_dtype: str = "float32") -> Sequential:
    """vision → prefill → Loop(denoise, num_steps): contracts with a dynamic "batch".

    `kv_dtype` is the page pool's: "float32" or "float8_e4m3fn" (stored with the per-layer
    `kv_scales` [L, 2] that prefill and denoise take; a float32 pool ignores them).
    """
    spec = _specs(cfg, kv_dtype)
    examples = _example_inputs(cfg, spec, next(model.parameters()).device)
    return chain_walks(model, spec, examples, DenoiseWalk,
                       "x_t t dt kv_pool block_table prefix_lens kv_scales", cfg.prefix_len)


def _example_inputs(cfg: Pi05Config, spec: dict[str, TensorSpec], device: torch.device
                    ) -> dict[str, torch.Tensor]:
    """Tracing inputs with batch = 2: fake_inputs where they exist, a filled pool and two
    requests' pages, prefix lengths that differ."""
    given = {k: torch.from_numpy(a) for k, a in fake_inputs(cfg, batch=2).items()}
    pages = kv_pages(cfg.prefix_len)  # per request; 2 requests + 1 spare page
    pool = torch.randn(cfg.llm.layers, 2, 2 * pages + 1, PAGE_SIZE, cfg.llm.kv_heads, cfg.llm.head_dim,
                       generator=torch.Generator().manual_seed(1))
    given |= {
        "kv_pool": pool.to(TORCH_POOL_DTYPES[spec["kv_pool"].dtype]),
        "kv_scales": torch.ones(cfg.llm.layers, 2),
        "block_table": torch.arange(2 * pages).reshape(2, pages) + 1,
        "prefix_lens": torch.tensor([cfg.prefix_len - 3, cfg.prefix_len // 2]),
        "x_t": given.pop("noise"), "t": torch.full((2,), 0.7), "dt": torch.full((1,), -1.0 / cfg.num_steps),
        "image_tokens": torch.randn(2, cfg.num_views * cfg.vision.tokens, cfg.llm.width,
                                    generator=torch.Generator().manual_seed(0)),
    }
    return {name: given[name].to(device) for name in spec if name not in ("kv_pool_out", "x_next")}
