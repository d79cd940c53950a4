"""Llama decoder blocks (SmolLM2: SmolVLM's text model and SmolVLA's action expert).

Module names match transformers' `LlamaModel` state dict (`embed_tokens`, `layers.N.self_attn.
{q,k,v,o}_proj`, `layers.N.mlp.{gate,up,down}_proj`, `layers.N.{input,post_attention}_layernorm`,
`norm`), so a checkpoint maps onto it by prefix alone.

A layer is split as recipes/blocks/gemma.py splits Gemma's, so the caller decides what it attends to:

    q, k, v = layer_qkv(layer, x, table)       # pre-norm, q/k/v (no bias), RoPE on q and k
    out = attend(q, k_all, v_all, mask)        # gemma.attend, or PagedAttention over a cache
    x = layer_finish(layer, x, out)            # o_proj + residual, SiLU-gated MLP + residual

Llama differs from Gemma only in the norm's weighting (x̂·w, not x̂·(1 + w)), the MLP's activation
(SiLU, not tanh-GELU) and the unscaled token embedding. RoPE, the fp32 RMS statistics, head
splitting and the grouped-query attention are Gemma's own functions: transformers' Llama RoPE and
LeRobot's SmolVLA `apply_rope` (split halves, x1·cos − x2·sin ‖ x2·cos + x1·sin, frequencies
base^(−2i/Dh)) are `gemma.rope`'s rotate-half maths exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from walkforge.recipes.blocks.gemma import apply_rope, rms_normalize, split_heads

__all__ = ["Llama", "LlamaConfig", "LlamaLayer", "LlamaRMSNorm", "layer_finish", "layer_q", "layer_qkv"]


@dataclass(frozen=True)
class LlamaConfig:
    """Sizes of a Llama stack. `vocab = 0` builds no token embedding (an action expert).
    `rope_base` is what the caller passes to `gemma.rope` (SmolVLA: 10000, whatever the
    checkpoint's rope_theta says — LeRobot's own RoPE ignores it)."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int = 0
    eps: float = 1e-5
    rope_base: float = 10000.0


class LlamaRMSNorm(nn.Module):
    """Llama RMSNorm: w · x / rms(x), the statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps).type_as(x)


class LlamaAttention(nn.Module):
    """q/k/v/o projections, no biases; k and v have kv_heads · head_dim outputs (GQA)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, q, bias=False)
        self.k_proj = nn.Linear(cfg.width, kv, bias=False)
        self.v_proj = nn.Linear(cfg.width, kv, bias=False)
        self.o_proj = nn.Linear(q, cfg.width, bias=False)


class LlamaMLP(nn.Module):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp, bias=False)
        self.down_proj = nn.Linear(cfg.mlp, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    """One pre-norm decoder layer; run it with `layer_qkv` → attention → `layer_finish`."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(cfg.width, cfg.eps)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.width, cfg.eps)


class Llama(nn.Module):
    """A Llama stack: optional `embed_tokens` (unscaled), `layers`, final `norm`."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.vocab > 0:
            self.embed_tokens = nn.Embedding(cfg.vocab, cfg.width)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.layers))
        self.norm = LlamaRMSNorm(cfg.width, cfg.eps)


def layer_q(layer: LlamaLayer, x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Pre-norm and project x [B, S, D] to q [B, H, S, Dh], rotated by `table` (`gemma.rope`):
    the query of a layer whose keys and values come from elsewhere (SmolVLA's cross-attention)."""
    cfg = layer.cfg
    q = layer.self_attn.q_proj(layer.input_layernorm(x))
    return apply_rope(split_heads(q, cfg.heads, cfg.head_dim), table)


def layer_qkv(layer: LlamaLayer, x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-norm and project x [B, S, D] to q [B, H, S, Dh], k and v [B, KVH, S, Dh]; q and k are
    rotated by `table` (`gemma.rope(positions, …)`). k is what a KV cache stores."""
    cfg, attn = layer.cfg, layer.self_attn
    h = layer.input_layernorm(x)
    q = apply_rope(split_heads(attn.q_proj(h), cfg.heads, cfg.head_dim), table)
    k = apply_rope(split_heads(attn.k_proj(h), cfg.kv_heads, cfg.head_dim), table)
    v = split_heads(attn.v_proj(h), cfg.kv_heads, cfg.head_dim)
    return q, k, v


def layer_finish(layer: LlamaLayer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """x + o_proj(attn_out), then x + mlp(post_attention_layernorm(x)). [B, S, D]."""
    x = x + layer.self_attn.o_proj(attn_out)
    return x + layer.mlp(layer.post_attention_layernorm(x))
