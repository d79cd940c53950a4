"""pi0.5's walks and the run-time inputs of its front.

A request is three walks; vision and prefill are PaliGemma's (recipes/blocks/paligemma.py, the
same modules and contracts as pi0's, compacted cameras and prompts included):

    vision   images [B, V, 3, 224, 224] in [0, 1]  → image tokens [B, V·256, D_llm]
    prefill  image tokens + prompt (with the state) → per-layer prefix K/V (the KV cache)
    denoise  x_t, t + the cache                    → x_{t+dt}, run num_steps times (Euler)
"""

from __future__ import annotations

import numpy as np
import torch

from walkforge.graphs.walk import Sequential
from walkforge.recipes.blocks.flow import PagedCache, Parts, example_inputs, flow_chain, prefix_inputs
from walkforge.recipes.blocks.paligemma import (
    PREFILL_INPUTS,
    PREFILL_OUTPUTS,
    PrefillWalk,
    VisionWalk,
    flow_specs,
)
from walkforge.recipes.pi05.config import ACTION_HEADS, Pi05Config
from walkforge.recipes.pi05.model import Pi05Model

DENOISE_INPUTS = "x_t t dt kv_pool block_table prefix_lens kv_scales"


def fake_inputs(cfg: Pi05Config, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid run-time inputs (the front's, `noise` = the initial x_t). Request 0's last camera
    is masked off (when V > 1) and prompt lengths differ per request (right-padded with id 0)."""
    rng = np.random.default_rng(seed)
    return {
        **prefix_inputs(cfg, batch, rng),
        "noise": rng.standard_normal((batch, cfg.action_horizon, cfg.action_dim)).astype(np.float32),
    }


class DenoiseWalk(Parts, Pi05Model):
    """The expert and its action/time heads: one Euler step over the paged prefix."""

    parts = ("expert", *ACTION_HEADS)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, kv_pool: torch.Tensor,
                block_table: torch.Tensor, prefix_lens: torch.Tensor, kv_scales: torch.Tensor
                ) -> torch.Tensor:
        return self.denoise_step(x_t, t, dt, PagedCache(kv_pool, block_table, prefix_lens, kv_scales))


def walks(model: Pi05Model, cfg: Pi05Config, kv_dtype: str = "float32") -> Sequential:
    """vision → prefill → Loop(denoise, num_steps) over `flow_specs`.

    `kv_dtype` is the page pool's: "float32" or "float8_e4m3fn" (stored with the per-layer
    `kv_scales` [L, 2] that prefill and denoise take; a float32 pool ignores them).
    """
    spec = flow_specs(cfg, kv_dtype)
    examples = example_inputs(cfg, spec, fake_inputs(cfg, batch=2), next(model.parameters()).device)
    return flow_chain(model, spec, examples, {
        "vision": (VisionWalk, "images", "image_tokens"),
        "prefill": (PrefillWalk, PREFILL_INPUTS, PREFILL_OUTPUTS),
        "denoise": (DenoiseWalk, DENOISE_INPUTS, "x_next"),
    }, cfg.prefix_len)
