"""SmolVLA's walks and the run-time inputs of its front.

A request is three walks:

    vision   images [B, V, 3, S, S] in [0, 1]     → image tokens [B, V·T, D_llm] (T = 64 at 512 px)
    prefill  image tokens + prompt + state        → the page pool: per VLM layer its prefix K/V,
                                                    then per cross layer its projected K/V
    denoise  x_t, t + the pool                    → x_{t+dt}, run num_steps times (Euler)

The chain is every flow VLA's (recipes/blocks/flow.py). The state is a prefix token, so prefill
takes it and denoise does not. The camera count V ("views", up to the compiled `num_views`) and the
prompt length ("prompt_len", up to `max_prompt_len`) are dynamic, as pi0's: the front hands vision
only the cameras some request uses and prefill only the prompt columns some request fills.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from walkforge.graphs.walk import Sequential, TensorSpec
from walkforge.plugins.constants import PAGE_SIZE
from walkforge.recipes.blocks.flow import PagedCache, Parts, example_inputs, flow_chain, prefix_inputs
from walkforge.recipes.smolvla.config import ACTION_HEADS, SmolVLAConfig
from walkforge.recipes.smolvla.model import SmolVLAModel

PREFILL_INPUTS = "image_tokens image_masks prompt_ids prompt_mask state kv_pool block_table kv_scales"
PREFILL_OUTPUTS = "kv_pool_out prefix_lens"
DENOISE_INPUTS = "x_t t dt kv_pool block_table prefix_lens kv_scales"


def specs(cfg: SmolVLAConfig, kv_dtype: str) -> dict[str, TensorSpec]:
    """The walks' contracts: a dynamic "batch", "views" (each cfg.image_tokens image tokens) and
    "prompt_len", and the page pool of `kv_dtype` ("float32" or "float8_e4m3fn") with
    `cfg.pool_layers` layers (the VLM's, then the cross layers') and their `kv_scales`."""
    b, s, llm = "batch", cfg.vision.image_size, cfg.llm
    pool = (cfg.pool_layers, 2, "num_pages", PAGE_SIZE, llm.kv_heads, llm.head_dim)
    actions = (b, cfg.action_horizon, cfg.action_dim)
    return {x.name: x for x in (
        TensorSpec("images", "float32", (b, "views", 3, s, s)),
        TensorSpec("image_tokens", "float32", (b, "image_tokens", llm.width)),  # views · tokens
        TensorSpec("image_masks", "bool", (b, "views")),
        TensorSpec("prompt_ids", "int64", (b, "prompt_len")),
        TensorSpec("prompt_mask", "bool", (b, "prompt_len")),
        TensorSpec("state", "float32", (b, cfg.state_dim)),
        TensorSpec("kv_pool", kv_dtype, pool), TensorSpec("kv_pool_out", kv_dtype, pool),
        TensorSpec("kv_scales", "float32", (cfg.pool_layers, 2)),
        TensorSpec("block_table", "int64", (b, "max_pages")), TensorSpec("prefix_lens", "int64", (b,)),
        TensorSpec("x_t", "float32", actions), TensorSpec("t", "float32", (b,)),
        TensorSpec("dt", "float32", (1,)), TensorSpec("x_next", "float32", actions),
    )}




def fake_inputs(cfg: SmolVLAConfig, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid run-time inputs (the front's, `noise` = the initial x_t). Request 0's last camera
    is masked off (when V > 1) and prompt lengths differ per request (right-padded with id 0)."""
    rng = np.random.default_rng(seed)
    return {
        **prefix_inputs(cfg, batch, rng),
        "state": rng.uniform(-1, 1, (batch, cfg.state_dim)).astype(np.float32),
        "noise": rng.standard_normal((batch, cfg.action_horizon, cfg.action_dim)).astype(np.float32),
    }


class VisionWalk(Parts, SmolVLAModel):
    """images [B, V, 3, S, S] in [0, 1] → image tokens [B, V·T, D_llm]."""

    parts = ("vision", "connector")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_images(images)


class PrefillWalk(Parts, SmolVLAModel):
    """The prefix into the page pool (`PREFILL_INPUTS` → `PREFILL_OUTPUTS`); of the expert only
    the cross layers' k_proj / v_proj run here."""

    parts = ("llm", "state_proj", "expert")

    def forward(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                prompt_mask: torch.Tensor, state: torch.Tensor, kv_pool: torch.Tensor,
                block_table: torch.Tensor, kv_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prefill_paged(image_tokens, image_masks, prompt_ids, prompt_mask, state, kv_pool,
                                  block_table, kv_scales)


class DenoiseWalk(Parts, SmolVLAModel):
    """The expert and its action/time heads: one Euler step over the paged prefix."""

    parts = ("expert", *(h for h in ACTION_HEADS if h != "state_proj"))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, kv_pool: torch.Tensor,
                block_table: torch.Tensor, prefix_lens: torch.Tensor, kv_scales: torch.Tensor
                ) -> torch.Tensor:
        return self.denoise_step(x_t, t, dt, PagedCache(kv_pool, block_table, prefix_lens, kv_scales))


def walks(model: SmolVLAModel, cfg: SmolVLAConfig, kv_dtype: str = "float32") -> Sequential:
    """vision → prefill → Loop(denoise, num_steps) over `specs`.

    `kv_dtype` is the page pool's: "float32" or "float8_e4m3fn" (stored with the per-layer
    `kv_scales` [L + n_cross, 2] that prefill and denoise take; a float32 pool ignores them).
    """
    spec = specs(cfg, kv_dtype)
    examples = example_inputs(cfg, spec, fake_inputs(cfg, batch=2), next(model.parameters()).device)
    chain: dict[str, tuple[type[nn.Module], str, str]] = {
        "vision": (VisionWalk, "images", "image_tokens"),
        "prefill": (PrefillWalk, PREFILL_INPUTS, PREFILL_OUTPUTS),
        "denoise": (DenoiseWalk, DENOISE_INPUTS, "x_next"),
    }
    return flow_chain(model, spec, examples, chain, cfg.prefix_len)
