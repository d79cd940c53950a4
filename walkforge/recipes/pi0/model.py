"""pi0 modules: a PaliGemma VLM (SigLIP + Gemma-2B) and a Gemma-300M action expert, flow matching.

The prefix (images, then the prompt) goes through the VLM once. Each Euler step runs only
the expert over the suffix [state token, action tokens]; in every layer the suffix attends
to the cached prefix K/V followed by its own K/V. t = 1 is noise, t = 0 is data.
Read top to bottom: masks → caches → Pi0Model (embed_prefix / embed_suffix → prefill →
denoise_step → sample_actions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from walkforge.plugins import kv_cache_write, paged_attention  # noqa: F401  registers torch.ops.walkforge
from walkforge.recipes.blocks.gemma import Gemma, attend, layer_finish, layer_qkv, rope
from walkforge.recipes.blocks.siglip import SiglipVision
from walkforge.recipes.pi0.config import Pi0Config


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0
                   ) -> torch.Tensor:
    """Sinusoid of flow time t [B] → [B, dim]: periods min…max on a log scale, in float64."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    x = (1.0 / period * 2 * math.pi)[None, :] * t.double()[:, None]  # [B, dim / 2]
    return torch.cat([x.sin(), x.cos()], dim=-1).float()


def make_attention_mask(pad_mask: torch.Tensor, ar_mask: torch.Tensor) -> torch.Tensor:
    """Who may attend to whom: bool [B, N, N], True where token i (row) may see token j.

    Every token carries a flag ar ("starts a new block"). Token i sees token j iff
    cumsum(ar)[j] <= cumsum(ar)[i] and both are real (pad_mask). So flags 0 everywhere give
    bidirectional attention; a 1 starts a block that sees everything before it, while nothing
    before it sees into it. pad_mask: bool [B, N]; ar_mask: bool [N] or [B, N].
    """
    cum = torch.cumsum(ar_mask.long(), dim=-1)
    allowed = cum[..., None, :] <= cum[..., :, None]
    return allowed & pad_mask[:, None, :] & pad_mask[:, :, None]


def suffix_attention_mask(prefix_mask: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
    """The suffix rows of the full mask, over keys [prefix, suffix]: bool [B, 1, S, P+S].

    The suffix's ar cumsum is ≥ 1 > 0 = the prefix's, so every suffix token sees every real
    prefix token; among themselves the suffix tokens follow `suffix_mask` [S, S] (from
    `make_attention_mask`). prefix_mask: bool [B, P].
    """
    to_prefix = prefix_mask[:, None, :].expand(-1, suffix_mask.shape[0], -1)  # [B, S, P]
    return torch.cat([to_prefix, suffix_mask.expand(prefix_mask.shape[0], -1, -1)], dim=-1)[:, None]


class DenseCache:
    """The prefix K/V as dense tensors (the eager reference): k/v [L, B, KVH, P, Dh], mask [B, P]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
        self.k, self.v, self.mask = k, v, mask

    def lengths(self) -> torch.Tensor:
        return self.mask.long().sum(-1)  # [B]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               suffix_mask: torch.Tensor) -> torch.Tensor:
        """q: [B, H, S, Dh]; k, v: [B, KVH, S, Dh] → [B, S, H·Dh]; keys = [prefix, own suffix]."""
        mask = suffix_attention_mask(self.mask, suffix_mask)
        keys, values = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        return attend(q, keys, values, mask)


class PagedCache:
    """The prefix K/V in the runtime's page pool, read through the PagedAttention op.

    pool [L, 2, NP, PS, KVH, Dh] (float32 or float8_e4m3fn); block_table int64 [B, MP]; lengths
    int64 [B] (valid tokens, stored compactly at logical positions 0..lengths-1); kv_scales [L, 2]
    (an fp8 pool's K and V scale per layer; a float32 pool ignores them).
    """

    def __init__(self, pool: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor,
                 kv_scales: torch.Tensor) -> None:
        self.pool, self.block_table, self._lengths, self.kv_scales = pool, block_table, lengths, kv_scales

    def lengths(self) -> torch.Tensor:
        return self._lengths

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               suffix_mask: torch.Tensor) -> torch.Tensor:
        out = torch.ops.walkforge.paged_attention(q, k, v, self.pool, self.block_table, self._lengths,
                                                  suffix_mask, layer, q.shape[-1] ** -0.5, self.kv_scales)
        return out.transpose(1, 2).flatten(2)  # [B, H, S, Dh] → [B, S, H·Dh]


class Pi0Model(nn.Module):
    """pi0 modules (names follow LeRobot's checkpoint through checkpoint.KEY_MAP)."""

    def __init__(self, cfg: Pi0Config) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.expert.width
        self.vision = SiglipVision(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.llm.width)
        self.llm = Gemma(cfg.llm)
        self.expert = Gemma(cfg.expert)
        self.state_proj = nn.Linear(cfg.state_dim, d)
        self.action_in_proj = nn.Linear(cfg.action_dim, d)
        self.action_out_proj = nn.Linear(d, cfg.action_dim)
        self.action_time_mlp_in = nn.Linear(2 * d, d)
        self.action_time_mlp_out = nn.Linear(d, d)

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

    def embed_suffix(self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Suffix = [state token, one token per action], ar flags [1, 1, 0, …].

        The state token starts a block (the prefix cannot see it), the actions start another
        (the state cannot see them; they see the state and each other). Each action token is
        mlp_out(silu(mlp_in([action_in_proj(x_t), time_embedding(t)]))).
        Returns tokens [B, S, D_exp], pad mask bool [B, S] (all real), ar mask bool [S].
        """
        actions = self.action_in_proj(x_t)  # [B, H, D]
        emb = time_embedding(t, actions.shape[-1]).to(actions.dtype)
        emb = emb[:, None, :].expand(-1, actions.shape[1], -1)
        actions = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, emb], -1))))
        tokens = torch.cat([self.state_proj(state)[:, None, :], actions], dim=1)
        pad = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        ar = torch.arange(tokens.shape[1], device=tokens.device) < 2
        return tokens, pad, ar

    make_attention_mask = staticmethod(make_attention_mask)

    def prefill(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the VLM over the prefix once; return its KV cache.

        prefix_k/v: [layers, B, KVH, P, Dh] (K after RoPE), prefix_mask: bool [B, P].
        Positions count real tokens only: cumsum(pad) - 1.
        """
        x, pad, ar = self.embed_prefix(image_tokens, image_masks, prompt_ids, prompt_mask)
        mask = make_attention_mask(pad, ar)[:, None]  # [B, 1, P, P]
        table = rope(torch.cumsum(pad.long(), dim=-1) - 1, self.cfg.llm.head_dim, self.cfg.llm.rope_base)
        ks, vs = [], []
        for i, layer in enumerate(self.llm.layers):
            q, k, v = layer_qkv(layer, x, table)
            ks.append(k)
            vs.append(v)
            if i + 1 < len(self.llm.layers):  # the last layer's output is never read
                x = layer_finish(layer, x, attend(q, k, v, mask))
        return torch.stack(ks), torch.stack(vs), pad

    def denoise_step(self, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, state: torch.Tensor,
                     cache: DenseCache | PagedCache) -> torch.Tensor:
        """One Euler step: x_t [B, H, A], t [B], dt [1] → x_t + dt · v(x_t, t), [B, H, A].

        Suffix positions continue after the real prefix tokens: n_valid_prefix + arange(S).
        Every real suffix token sees every real prefix token (its ar cumsum is ≥ 1 > 0); among
        themselves the suffix tokens follow `make_attention_mask`.
        """
        x, pad, ar = self.embed_suffix(state, x_t, t)
        suffix_mask = make_attention_mask(pad[:1], ar)[0]  # [S, S]; the suffix has no padding
        positions = cache.lengths()[:, None] + torch.arange(x.shape[1], device=x.device)
        table = rope(positions, self.cfg.expert.head_dim, self.cfg.expert.rope_base)
        for i, layer in enumerate(self.expert.layers):
            q, k, v = layer_qkv(layer, x, table)
            x = layer_finish(layer, x, cache.attend(i, q, k, v, suffix_mask))
        velocity = self.action_out_proj(self.expert.norm(x)[:, -self.cfg.action_horizon:])
        return x_t + dt * velocity

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

    def sample_actions(self, images: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor, state: torch.Tensor, noise: torch.Tensor,
                       num_steps: int | None = None) -> torch.Tensor:
        """Eager reference: prefill once, then Euler from t = 1 (noise [B, H, A]) towards 0.

        dt = -1/steps, t_k = 1 + k·dt. Returns actions [B, H, A].
        """
        steps = num_steps or self.cfg.num_steps
        cache = self.prefill(self.embed_images(images), image_masks, prompt_ids, prompt_mask)
        dt = -1.0 / steps
        x = noise
        for k in range(steps):
            t = torch.full((x.shape[0],), 1.0 + k * dt, device=x.device)
            x = self.denoise_step(x, t, torch.tensor([dt], device=x.device), state, DenseCache(*cache))
        return x


def build(cfg: Pi0Config) -> Pi0Model:
    """pi0 modules with default init; the caller seeds them or loads a checkpoint."""
    return Pi0Model(cfg)
