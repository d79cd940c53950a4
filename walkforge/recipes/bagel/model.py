"""BAGEL text-to-image modules: a Qwen2 MoT LLM (und + gen experts), the generation heads and the
FLUX VAE decoder; rectified flow with classifier-free guidance over cached contexts.

The context `[<|im_start|>] prompt [<|im_end|>]` goes through the und expert once (causal; K after
k_norm and RoPE is cached). Each velocity evaluation runs the generation query
`[<|vision_start|>, n latent tokens, <|vision_end|>]` — markers on und weights, latents on gen
weights, all n + 2 at one RoPE position (the context length), non-causal — over each CFG branch's
cache: the full context, and the text-dropped one, which is empty. In text-to-image the
image-dropped context *is* the full one, so its velocity is the full branch's. t = 1 is noise,
t = 0 data; x ← x + dt·v with dt < 0. Latents are kept as a grid [B, h, w, 64]: token (r, c) of
BAGEL's raster layout, feature (dy·2 + dx)·16 + channel.
Read top to bottom: heads → cfg_combine → BagelModel (prefill → velocity → denoise_step → decode
→ generate).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from walkforge.plugins import kv_cache_write, paged_attention  # noqa: F401  registers torch.ops.walkforge
from walkforge.recipes.bagel.config import LATENT_PATCH, TIME_FREQS, BagelConfig
from walkforge.recipes.blocks.autoencoder import AutoencoderKLDecoder
from walkforge.recipes.blocks.flow import DenseCache
from walkforge.recipes.blocks.gemma import attend, rope
from walkforge.recipes.blocks.qwen2 import Qwen2, layer_finish, layer_qkv

RENORM_TYPES = ("global", "channel", "text_channel")
"""cfg_renorm_type names, by the code the denoise walk takes (index)."""
RENORM_EPS = 1e-8


class TimestepEmbedder(nn.Module):
    """t [B] in [0, 1] (not ×1000) → [cos(t·f_i)] ++ [sin(t·f_i)], f_i = 10000^(−i/128) → MLP [B, D]."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQS, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = TIME_FREQS // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def sincos_2d(side: int, width: int) -> torch.Tensor:
    """BAGEL's fixed latent position table [side², width], row r·side + c: the first width/2 dims
    encode the column c, the last the row r, each [sin(p·ω_i)] ++ [cos(p·ω_i)], ω_i = 10000^(−4i/width)
    (float64, then fp32)."""
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))

    def half(p: np.ndarray) -> np.ndarray:
        out = p.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(
        np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij"
    )
    return torch.from_numpy(np.concatenate([half(cols), half(rows)], axis=1)).float()


class PositionEmbedding(nn.Module):
    """`pos_embed` [max_latent_size², D]: fixed sin-cos, but a checkpoint tensor (loaded, shape-checked)."""

    def __init__(self, side: int, width: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(sincos_2d(side, width), requires_grad=False)


def cfg_combine(
    v: torch.Tensor,
    t: torch.Tensor,
    scale: torch.Tensor,
    interval: torch.Tensor,
    renorm_min: torch.Tensor,
    renorm_type: torch.Tensor,
) -> torch.Tensor:
    """BAGEL's guided velocity from the branch velocities v [branches, B, h, w, C] (branch 0 the
    full context v_c, the last the text-dropped v_t; one branch: no text guidance).

    scale [2] = (s_t, s_i), interval [2] = (lo, hi), renorm_min [1], renorm_type int64 [1] (an index of
    RENORM_TYPES). Guidance is on for image b iff lo < t[b] ≤ hi and s_t > 1; otherwise v = v_c.
    v_i = v_c (text-to-image: the image-dropped context is the full one). With
    a = v_t + s_t(v_c − v_t), and b = v_c + s_i(a − v_c) if s_i > 1 else a:
      global        v = r·b, r = clamp(‖v_c‖ / (‖b‖ + ε), min, 1) over all of the image's values
      channel       the same with one r per token (norm over its C values)
      text_channel  a' = r·a with r per token from ‖v_c‖/(‖a‖ + ε); v = v_c + s_i(a' − v_c) if s_i > 1 else a'
    Returns [B, h, w, C].
    """
    v_c, v_t = v[0], v[-1]
    s_t, s_i = scale[0], scale[1]
    a = v_t + s_t * (v_c - v_t)
    image_step = s_i > 1.0
    b = torch.where(image_step, v_c + s_i * (a - v_c), a)

    def ratio(num: torch.Tensor, den: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        r = num.pow(2).sum(dims, keepdim=True).sqrt() / (
            den.pow(2).sum(dims, keepdim=True).sqrt() + RENORM_EPS
        )
        return torch.minimum(torch.maximum(r, renorm_min), torch.ones_like(r))

    per_image, per_token = (1, 2, 3), (3,)
    text = ratio(v_c, a, per_token) * a
    text = torch.where(image_step, v_c + s_i * (text - v_c), text)
    kind = renorm_type[0]
    out = torch.where(
        kind == 0, ratio(v_c, b, per_image) * b, torch.where(kind == 1, ratio(v_c, b, per_token) * b, text)
    )
    guided = (interval[0] < t) & (t <= interval[1]) & (s_t > 1.0)  # [B]
    return torch.where(guided[:, None, None, None], out, v_c)


class BagelModel(nn.Module):
    """BAGEL's text-to-image modules under Bagel's names (`language_model.model.*` → `llm.*`, see
    checkpoint.KEY_MAP) and the FLUX decoder under diffusers' (`vae.decoder.*`)."""

    def __init__(self, cfg: BagelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.llm.width
        self.llm = Qwen2(cfg.llm)
        self.time_embedder = TimestepEmbedder(d)
        self.vae2llm = nn.Linear(cfg.latent_dim, d)
        self.llm2vae = nn.Linear(d, cfg.latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, d)
        self.vae = AutoencoderKLDecoder(
            cfg.vae_latent_channels,
            3,
            cfg.vae_channels,
            cfg.vae_blocks,
            cfg.vae_groups,
            mid_attention=True,
            post_quant_conv=False,
        )

    def prefill(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The und expert over wrapped contexts ids [B, P] (right-padded, mask bool [B, P]), causal,
        positions 0…L−1. Returns k, v [layers, B, KVH, P, Dh] (K after k_norm and RoPE)."""
        x = self.llm.embed_tokens(prompt_ids)
        positions = (torch.cumsum(prompt_mask.long(), -1) - 1).clamp(min=0)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        mask = (causal[None] & prompt_mask[:, None, :])[:, None]  # [B, 1, P, P]
        table = rope(positions, self.cfg.llm.head_dim, self.cfg.llm.rope_base)
        ks, vs = [], []
        for i, layer in enumerate(self.llm.layers):
            q, k, v = layer_qkv(layer, x, table, "und")
            ks.append(k)
            vs.append(v)
            if i + 1 < len(self.llm.layers):  # the last layer's output is never read
                x = layer_finish(layer, x, attend(q, k, v, mask), "und")
        return torch.stack(ks), torch.stack(vs)

    def markers(self) -> torch.Tensor:
        """Embeddings of [<|vision_start|>, <|vision_end|>]: [2, D]."""
        tokens = self.cfg.special_tokens
        step = tokens.end_of_image - tokens.start_of_image  # arange, not a tensor literal: no lifted constant
        ids = torch.arange(2, device=self.llm.embed_tokens.weight.device) * step + tokens.start_of_image
        return self.llm.embed_tokens(ids)

    def embed_latents(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t [B, h, w, C], t [B] → vae2llm(x_t) + time_embedder(t) + pos_embed[r·M + c]: [B, h·w, D]."""
        b, h, w, c = x_t.shape
        side = self.cfg.max_latent_size
        ids = (
            torch.arange(h, device=x_t.device)[:, None] * side + torch.arange(w, device=x_t.device)
        ).reshape(-1)
        pos = self.latent_pos_embed.pos_embed[ids]  # [h·w, D]
        return self.vae2llm(x_t.reshape(b, h * w, c)) + self.time_embedder(t)[:, None] + pos[None]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, markers: torch.Tensor, cache) -> torch.Tensor:
        """The flow velocity of x_t [B, h, w, C] over every cache row (row r: branch r // B, image
        r % B; its context length is the query's RoPE position): [branches, B, h, w, C]."""
        b, h, w, c = x_t.shape
        rows = cache.lengths().shape[0]
        gen = self.embed_latents(x_t, t).repeat(rows // b, 1, 1)  # [R, n, D]
        und = markers[None].expand(rows, -1, -1)  # [R, 2, D]
        table = rope(cache.lengths()[:, None], self.cfg.llm.head_dim, self.cfg.llm.rope_base)  # one position
        both = torch.ones(2 + h * w, 2 + h * w, dtype=torch.bool, device=x_t.device)  # non-causal
        last = len(self.llm.layers) - 1
        for i, layer in enumerate(self.llm.layers):
            (qu, ku, vu), (qg, kg, vg) = (
                layer_qkv(layer, und, table, "und"),
                layer_qkv(layer, gen, table, "gen"),
            )
            out = cache.attend(
                i, torch.cat([qu, qg], 2), torch.cat([ku, kg], 2), torch.cat([vu, vg], 2), both
            )
            gen = layer_finish(layer, gen, out[:, 2:], "gen")
            if i < last:  # the markers' last-layer output is never read
                und = layer_finish(layer, und, out[:, :2], "und")
        v = self.llm2vae(self.llm.final_norm(gen, "gen"))  # [R, n, C]
        return v.reshape(rows // b, b, h, w, c)

    def denoise_step(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        dt: torch.Tensor,
        markers: torch.Tensor,
        cache,
        scale: torch.Tensor,
        interval: torch.Tensor,
        renorm_min: torch.Tensor,
        renorm_type: torch.Tensor,
    ) -> torch.Tensor:
        """One guided Euler step: x_t + dt · cfg_combine(velocity(x_t, t)), [B, h, w, C]."""
        v = cfg_combine(self.velocity(x_t, t, markers, cache), t, scale, interval, renorm_min, renorm_type)
        return x_t + dt * v

    def decode(self, x_t: torch.Tensor) -> torch.Tensor:
        """Latent grid [B, h, w, C] → image [B, H, W, 3] in [0, 1]: unpatchify to [B, 16, 2h, 2w],
        z / scale + shift, the FLUX decoder, clamp(0.5·y + 0.5, 0, 1)."""
        b, h, w, _ = x_t.shape
        p, ch = LATENT_PATCH, self.cfg.vae_latent_channels
        z = x_t.reshape(b, h, w, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(b, ch, h * p, w * p)
        y = self.vae(z / self.cfg.vae_scale + self.cfg.vae_shift)
        return (0.5 * y + 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1)

    def generate(
        self,
        prompt_ids: torch.Tensor,
        noise: torch.Tensor,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager reference for one image: wrapped context ids [1, L], noise [1, h, w, C] →
        (final latents [1, h, w, C], image [1, H, W, 3]); dense caches, the text-dropped one empty."""
        k, v = self.prefill(prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool))
        rows = 2 if cfg_text_scale > 1.0 else 1
        pad = torch.zeros_like(k[:, :1]).expand(-1, rows - 1, -1, -1, -1)
        mask = torch.arange(rows)[:, None] == 0  # row 0 sees the prompt, row 1 (empty) nothing
        cache = DenseCache(torch.cat([k, pad], 1), torch.cat([v, pad], 1), mask.expand(-1, k.shape[3]))
        args = (
            torch.tensor([cfg_text_scale, cfg_img_scale]),
            torch.tensor(cfg_interval, dtype=torch.float32),
            torch.tensor([cfg_renorm_min]),
            torch.tensor([RENORM_TYPES.index(cfg_renorm_type)]),
        )
        x, markers = noise, self.markers()
        ts = shifted_timesteps(num_timesteps, timestep_shift)
        for k_step in range(num_timesteps - 1):
            dt = torch.tensor([ts[k_step + 1] - ts[k_step]])
            x = self.denoise_step(x, torch.tensor([ts[k_step]]), dt, markers, cache, *args)
        return x, self.decode(x)


def shifted_timesteps(num_timesteps: int, shift: float) -> list[float]:
    """BAGEL's t_k = s·u_k / (1 + (s − 1)·u_k), u = linspace(1, 0, N) in fp32."""
    u = torch.linspace(1, 0, num_timesteps)
    return (shift * u / (1 + (shift - 1) * u)).tolist()


def build(cfg: BagelConfig) -> BagelModel:
    """BAGEL modules with default init (the position table is its sin-cos); the caller seeds them or
    loads a checkpoint."""
    return BagelModel(cfg)
