"""The PaliGemma-style prefix pi0 and pi0.5 share: SigLIP → projector image tokens, then the
prompt's embeddings, one bidirectional pass of the Gemma VLM whose per-layer K/V are the cache.

`PaliGemmaPrefix` is a mixin of the prefix methods for a model holding `vision` (SiglipVision),
`projector` (Linear), `llm` (Gemma) and `cfg` (with `vision`, `llm`); `VisionWalk` and
`PrefillWalk` are its two walks. The names follow LeRobot's checkpoints through the recipes' key
maps (recipes/blocks/paligemma_folder.py reads those folders).
"""

from __future__ import annotations

import torch
from torch import nn

from walkforge.graphs.walk import TensorSpec
from walkforge.plugins.constants import PAGE_SIZE
from walkforge.recipes.blocks.flow import Parts, prefix_kv
from walkforge.recipes.blocks.gemma import layer_finish, layer_qkv, rope

PREFILL_INPUTS = "image_tokens image_masks prompt_ids prompt_mask kv_pool block_table kv_scales"
PREFILL_OUTPUTS = "kv_pool_out prefix_lens"


def flow_specs(cfg: object, kv_dtype: str, *extra: TensorSpec) -> dict[str, TensorSpec]:
    """The contracts of a PaliGemma flow VLA's walks (pi0 adds `state`): a dynamic "batch",
    "views" (≤ cfg.num_views cameras, each cfg.vision.tokens image tokens) and "prompt_len"
    (≤ cfg.max_prompt_len) — the front compacts both — and the page pool of `kv_dtype`
    ("float32" or "float8_e4m3fn", with per-layer `kv_scales` [L, 2])."""
    c = cfg  # a Pi0Config or Pi05Config
    b, s, llm = "batch", c.vision.image_size, c.llm  # type: ignore[attr-defined]
    pool = (llm.layers, 2, "num_pages", PAGE_SIZE, llm.kv_heads, llm.head_dim)
    actions = (b, c.action_horizon, c.action_dim)  # type: ignore[attr-defined]
    return {x.name: x for x in (
        TensorSpec("images", "float32", (b, "views", 3, s, s)),
        TensorSpec("image_tokens", "float32", (b, "image_tokens", llm.width)),  # views · tokens
        TensorSpec("image_masks", "bool", (b, "views")),
        TensorSpec("prompt_ids", "int64", (b, "prompt_len")),
        TensorSpec("prompt_mask", "bool", (b, "prompt_len")),
        TensorSpec("kv_pool", kv_dtype, pool), TensorSpec("kv_pool_out", kv_dtype, pool),
        TensorSpec("kv_scales", "float32", (llm.layers, 2)),
        TensorSpec("block_table", "int64", (b, "max_pages")), TensorSpec("prefix_lens", "int64", (b,)),
        TensorSpec("x_t", "float32", actions), TensorSpec("t", "float32", (b,)),
        TensorSpec("dt", "float32", (1,)), *extra, TensorSpec("x_next", "float32", actions),
    )}




class PaliGemmaPrefix:
    """The prefix methods (module doc); mixed into an nn.Module."""

    cfg: object
    vision: nn.Module
    projector: nn.Module
    llm: nn.Module

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, V, 3, 224, 224] in [0, 1] → unscaled image tokens [B, V·256, D_llm]."""
        x = images.reshape(-1, *images.shape[2:]) * 2.0 - 1.0  # [B·V, 3, 224, 224] in [-1, 1]
        tokens = self.projector(self.vision(x))  # [B·V, 256, D_llm]
        return tokens.reshape(images.shape[0], -1, tokens.shape[-1])

    def embed_prefix(self, image_tokens: torch.Tensor, image_masks: torch.Tensor,
                     prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix = [256 tokens per camera] ++ [prompt], all ar flags 0 (bidirectional).

        Returns tokens [B, P, D_llm], pad mask bool [B, P] (each camera's mask repeated 256
        times, then the prompt mask), ar mask bool [P].
        """
        n = self.cfg.vision.tokens
        image_pad = image_masks[:, :, None].expand(-1, -1, n).reshape(image_masks.shape[0], -1)
        tokens = torch.cat([image_tokens, self.llm.embed(prompt_ids)], dim=1)
        pad = torch.cat([image_pad, prompt_mask], dim=1)
        return tokens, pad, torch.zeros(pad.shape[1], dtype=torch.bool, device=pad.device)

    def prefill(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the VLM over the prefix once; return its KV cache.

        prefix_k/v: [layers, B, KVH, P, Dh] (K after RoPE), prefix_mask: bool [B, P].
        Positions count real tokens only: cumsum(pad) - 1.
        """
        x, pad, ar = self.embed_prefix(image_tokens, image_masks, prompt_ids, prompt_mask)
        table = rope(torch.cumsum(pad.long(), dim=-1) - 1, self.cfg.llm.head_dim, self.cfg.llm.rope_base)
        return (*prefix_kv(self.llm.layers, x, pad, ar, table, layer_qkv, layer_finish), pad)

    def prefill_paged(self, image_tokens: torch.Tensor, image_masks: torch.Tensor,
                      prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, kv_pool: torch.Tensor,
                      block_table: torch.Tensor, kv_scales: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill, writing the valid tokens' K/V compactly into the page pool (KVCacheWrite; an
        fp8 pool stores them quantised with kv_scales [L, 2]).

        Returns (the updated pool — the runtime binds it to the same buffer — and lengths [B]).
        """
        k, v, pad = self.prefill(image_tokens, image_masks, prompt_ids, prompt_mask)
        positions = torch.where(pad, torch.cumsum(pad.long(), dim=-1) - 1, -1)  # [B, P]; -1 = skip
        pool = torch.ops.walkforge.kv_cache_write(kv_pool, k, v, block_table, positions, kv_scales)
        return pool, pad.long().sum(-1)


class VisionWalk(Parts, PaliGemmaPrefix, nn.Module):
    """images [B, V, 3, S, S] in [0, 1] → image tokens [B, V·T, D_llm]."""

    parts = ("vision", "projector")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_images(images)


class PrefillWalk(Parts, PaliGemmaPrefix, nn.Module):
    """The prefix into the page pool (`PREFILL_INPUTS` → `PREFILL_OUTPUTS`)."""

    parts = ("llm",)

    def forward(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                prompt_mask: torch.Tensor, kv_pool: torch.Tensor, block_table: torch.Tensor,
                kv_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prefill_paged(image_tokens, image_masks, prompt_ids, prompt_mask, kv_pool, block_table,
                                  kv_scales)
