"""SmolVLA modules: SmolVLM2 (SigLIP tower, pixel-shuffle connector, the first text layers of
SmolLM2) and a narrower Llama action expert, flow matching (LeRobot v0.6.1's `modeling_smolvla`).

The prefix [image tokens per camera, prompt, one state token] goes through the kept VLM layers
once; their K/V (after RoPE) are the cache. Each Euler step runs only the expert over the action
tokens, whose layers alternate: a self-attention layer attends to its VLM layer's cached prefix
K/V followed by its own (causally among the actions), a cross-attention layer attends to the
valid prefix only, with K/V = its own k_proj / v_proj applied to the VLM layer's cached K/V.

Those cross K/V depend on the prefix alone, so `prefill_paged` computes them once per chunk and
writes them into extra layers of the page pool: pool layer i < L is VLM layer i, pool layer
L + j is the j-th cross layer's K/V (`SmolVLAConfig.cross_layers`). A cross layer then reads them
through the same PagedAttention op with a suffix mask that is all False (it sees the pages only);
its suffix K/V are zeros that no query sees. The eager reference (`prefix_cache`) holds the same
layers in a `DenseCache`, so `denoise_step` is one code path for both.
Read top to bottom: embed_images → embed_prefix → prefill → cross_kv → denoise_step → sample_actions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from walkforge.recipes.blocks.flow import (
    DenseCache,
    PagedCache,
    euler,
    make_attention_mask,
    prefix_kv,
    time_embedding,
)
from walkforge.recipes.blocks.gemma import rope, split_heads
from walkforge.recipes.blocks.llama import Llama, layer_finish, layer_q, layer_qkv
from walkforge.recipes.blocks.siglip import SiglipVision
from walkforge.recipes.blocks.smolvlm import SmolVLMConnector
from walkforge.recipes.smolvla.config import SmolVLAConfig

Cache = DenseCache | PagedCache


class SmolVLAModel(nn.Module):
    """SmolVLA modules (names follow LeRobot's checkpoint through checkpoint.KEY_MAP)."""

    def __init__(self, cfg: SmolVLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, kv = cfg.expert.width, cfg.llm.kv_heads * cfg.llm.head_dim
        self.vision = SiglipVision(cfg.vision)
        self.connector = SmolVLMConnector(cfg.vision.width, cfg.scale_factor, cfg.llm.width)
        self.llm = Llama(cfg.llm)
        self.expert = Llama(cfg.expert)
        for i in cfg.cross_layers:  # cross layers project the VLM's K/V, not the expert's tokens
            attn = self.expert.layers[i].self_attn
            attn.k_proj, attn.v_proj = nn.Linear(kv, kv, bias=False), nn.Linear(kv, kv, bias=False)
        self.state_proj = nn.Linear(cfg.state_dim, cfg.llm.width)
        self.action_in_proj = nn.Linear(cfg.action_dim, d)
        self.action_out_proj = nn.Linear(d, cfg.action_dim)
        self.action_time_mlp_in = nn.Linear(2 * d, d)
        self.action_time_mlp_out = nn.Linear(d, d)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, V, 3, S, S] in [0, 1] → image tokens [B, V·T, D_llm] (connector output)."""
        x = images.reshape(-1, *images.shape[2:]) * 2.0 - 1.0  # [B·V, 3, S, S] in [-1, 1]
        tokens = self.connector(self.vision(x))  # [B·V, T, D_llm]
        return tokens.reshape(images.shape[0], -1, tokens.shape[-1])

    def embed_prefix(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                     prompt_mask: torch.Tensor, state: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix = [T tokens per camera] ++ [prompt] ++ [state_proj(state)], the image and prompt
        embeddings × √D_llm. ar flags 0 for images and prompt, 1 for the state token: images and
        prompt see each other, never the state; the state sees them all.

        Returns tokens [B, P, D_llm], pad mask bool [B, P] (each camera's mask repeated T times,
        the prompt mask, True), ar mask bool [P].
        """
        scale = math.sqrt(self.cfg.llm.width)
        n, b = self.cfg.image_tokens, image_masks.shape[0]
        image_pad = image_masks[:, :, None].expand(-1, -1, n).reshape(b, -1)
        state_token = self.state_proj(state)[:, None]  # [B, 1, D_llm]
        tokens = torch.cat([image_tokens * scale, self.llm.embed_tokens(prompt_ids) * scale, state_token], 1)
        pad = torch.cat([image_pad, prompt_mask, torch.ones_like(image_pad[:, :1])], dim=1)
        ar = torch.arange(pad.shape[1], device=pad.device) == pad.shape[1] - 1
        return tokens, pad, ar

    def prefill(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                prompt_mask: torch.Tensor, state: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the kept VLM layers over the prefix once: k, v [L, B, KVH, P, Dh] (k after RoPE at
        positions cumsum(pad) − 1, LeRobot's base 10000) and the pad mask bool [B, P]."""
        x, pad, ar = self.embed_prefix(image_tokens, image_masks, prompt_ids, prompt_mask, state)
        table = rope(torch.cumsum(pad.long(), dim=-1) - 1, self.cfg.llm.head_dim, self.cfg.llm.rope_base)
        return (*prefix_kv(self.llm.layers, x, pad, ar, table, layer_qkv, layer_finish), pad)

    def cross_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross layers' K/V from the VLM's k, v [L, B, KVH, P, Dh]: cross layer j = expert
        layer i applies its k_proj / v_proj to VLM layer i's K/V (no further RoPE).
        Returns [n_cross, B, KVH, P, Dh] each."""
        cfg, ks, vs = self.cfg.expert, [], []
        for i in self.cfg.cross_layers:
            attn = self.expert.layers[i].self_attn
            ks.append(split_heads(attn.k_proj(k[i].transpose(1, 2).flatten(2)), cfg.kv_heads, cfg.head_dim))
            vs.append(split_heads(attn.v_proj(v[i].transpose(1, 2).flatten(2)), cfg.kv_heads, cfg.head_dim))
        return torch.stack(ks), torch.stack(vs)

    def prefix_kv(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                  prompt_mask: torch.Tensor, state: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every pool layer's K/V, [L + n_cross, B, KVH, P, Dh] each (VLM layers, then cross
        layers), and the pad mask [B, P]."""
        k, v, pad = self.prefill(image_tokens, image_masks, prompt_ids, prompt_mask, state)
        if not self.cfg.cross_layers:
            return k, v, pad
        ck, cv = self.cross_kv(k, v)
        return torch.cat([k, ck]), torch.cat([v, cv]), pad

    def prefix_cache(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                     prompt_mask: torch.Tensor, state: torch.Tensor) -> DenseCache:
        """The eager reference's cache: the pool's layers as dense tensors."""
        return DenseCache(*self.prefix_kv(image_tokens, image_masks, prompt_ids, prompt_mask, state))

    def prefill_paged(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                      prompt_mask: torch.Tensor, state: torch.Tensor, kv_pool: torch.Tensor,
                      block_table: torch.Tensor, kv_scales: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill, writing the valid tokens' K/V of every pool layer compactly into the page pool
        (KVCacheWrite; an fp8 pool stores them quantised with kv_scales [L + n_cross, 2]).

        Returns (the updated pool — the runtime binds it to the same buffer — and lengths [B]).
        """
        k, v, pad = self.prefix_kv(image_tokens, image_masks, prompt_ids, prompt_mask, state)
        positions = torch.where(pad, torch.cumsum(pad.long(), dim=-1) - 1, -1)  # [B, P]; -1 = skip
        pool = torch.ops.walkforge.kv_cache_write(kv_pool, k, v, block_table, positions, kv_scales)
        return pool, pad.long().sum(-1)

    def embed_suffix(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per action, mlp_out(silu(mlp_in([action_in_proj(x_t), sinusoid(t)]))), ar
        flags all 1: each action sees the prefix, itself and the actions before it.
        Returns tokens [B, H, D_exp] and the suffix mask bool [H, H] (lower triangular)."""
        actions = self.action_in_proj(x_t)  # [B, H, D]
        emb = time_embedding(t, actions.shape[-1]).to(actions.dtype)
        emb = emb[:, None, :].expand(-1, actions.shape[1], -1)
        tokens = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, emb], -1))))
        pad = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        ar = torch.ones(tokens.shape[1], dtype=torch.bool, device=tokens.device)
        return tokens, make_attention_mask(pad[:1], ar)[0]

    def denoise_step(self, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, cache: Cache
                     ) -> torch.Tensor:
        """One Euler step: x_t [B, H, A], t [B], dt [1] → x_t + dt · v(x_t, t), [B, H, A].

        Self-attention layers rotate at positions n_valid_prefix + arange(H) and read their VLM
        layer's K/V; cross-attention layers rotate q at arange(H) and read pool layer L + j.
        """
        cfg = self.cfg
        x, suffix_mask = self.embed_suffix(x_t, t)
        steps = torch.arange(x.shape[1], device=x.device)
        after_prefix = rope(cache.lengths()[:, None] + steps, cfg.expert.head_dim, cfg.expert.rope_base)
        from_zero = rope(steps[None], cfg.expert.head_dim, cfg.expert.rope_base)
        pool_layer = {i: cfg.llm.layers + j for j, i in enumerate(cfg.cross_layers)}
        for i, layer in enumerate(self.expert.layers):
            if i in pool_layer:
                q = layer_q(layer, x, from_zero)  # [B, H_heads, S, Dh]
                unseen = torch.zeros_like(q[:, : cfg.expert.kv_heads])  # masked out: pages only
                out = cache.attend(pool_layer[i], q, unseen, unseen, torch.zeros_like(suffix_mask))
            else:
                q, k, v = layer_qkv(layer, x, after_prefix)
                out = cache.attend(i, q, k, v, suffix_mask)
            x = layer_finish(layer, x, out)
        return x_t + dt * self.action_out_proj(self.expert.norm(x))

    def sample_actions(self, images: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor, state: torch.Tensor, noise: torch.Tensor,
                       num_steps: int | None = None) -> torch.Tensor:
        """Eager reference: prefill once (the cross K/V too), then Euler from t = 1 (noise
        [B, H, A]) towards 0: dt = −1/steps, t_k = 1 + k·dt. Returns actions [B, H, A]."""
        cache = self.prefix_cache(self.embed_images(images), image_masks, prompt_ids, prompt_mask, state)
        steps = num_steps or self.cfg.num_steps
        return euler(lambda x, t, dt: self.denoise_step(x, t, dt, cache), noise, steps)


def build(cfg: SmolVLAConfig) -> SmolVLAModel:
    """SmolVLA modules with default init; the caller seeds them or loads a checkpoint."""
    return SmolVLAModel(cfg)
