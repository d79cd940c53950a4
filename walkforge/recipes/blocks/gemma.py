"""Gemma decoder blocks, shared by every recipe that runs a Gemma language model or expert.

Module names match transformers' `GemmaModel` state dict (`embed_tokens`, `layers.N.self_attn.
{q,k,v,o}_proj`, `layers.N.mlp.{gate,up,down}_proj`, `layers.N.{input,post_attention}_layernorm`,
`norm`), so a checkpoint maps onto it by prefix alone.

A layer is split in two so that callers can decide what a layer attends to (its own tokens,
or a cached prefix followed by its own tokens):

    q, k, v = layer_qkv(layer, x, rope)        # pre-norm, projections, RoPE
    out = attend(q, k_all, v_all, mask)        # the one attention function
    x = layer_finish(layer, x, out)            # o_proj + residual, MLP + residual

Everything here is export-friendly: no Python branches on tensor values, no buffers (RoPE
tables are computed from positions), so modules built on the meta device trace as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Finite fill for masked attention logits: a fully masked (padding) row becomes a uniform
# softmax instead of NaN. Its output is never used.
MASK_FILL = -2.3819763e38


@dataclass(frozen=True)
class GemmaConfig:
    """Sizes of a Gemma stack. `vocab = 0` builds no token embedding (an action expert)."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int = 0
    eps: float = 1e-6
    rope_base: float = 10000.0


class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + w), computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.q_proj = nn.Linear(cfg.width, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.width, bias=False)


class GemmaMLP(nn.Module):
    """Gated MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp, bias=False)
        self.down_proj = nn.Linear(cfg.mlp, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    """One pre-norm decoder layer; run it with `layer_qkv` → `attend` → `layer_finish`."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.self_attn = GemmaAttention(cfg)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps)


class Gemma(nn.Module):
    """A Gemma stack: optional `embed_tokens`, `layers`, final `norm`."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.vocab > 0:
            self.embed_tokens = nn.Embedding(cfg.vocab, cfg.width)
        self.layers = nn.ModuleList(GemmaLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width, cfg.eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(width), as Gemma does. ids: [B, S] → [B, S, D]."""
        return self.embed_tokens(ids) * math.sqrt(self.cfg.width)


def rope(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for integer positions [B, S] → (cos, sin), each [B, S, head_dim].

    Frequencies are base^(-2i/head_dim); both halves of the head use the same frequencies
    (the rotate_half convention of transformers' Gemma).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [B, S, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [B, H, S, Dh] by the (cos, sin) tables [B, S, Dh]."""
    cos, sin = table[0][:, None], table[1][:, None]
    return x * cos + _rotate_half(x) * sin


def _heads(x: torch.Tensor, n: int, head_dim: int) -> torch.Tensor:
    # [B, S, n * Dh] -> [B, n, S, Dh]
    return x.reshape(x.shape[0], x.shape[1], n, head_dim).transpose(1, 2)


def layer_qkv(layer: GemmaLayer, x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-norm and project x [B, S, D] to q [B, H, S, Dh], k and v [B, KVH, S, Dh].

    RoPE (from `rope(positions, …)`) is applied to q and k; k is what a KV cache stores.
    """
    cfg, attn = layer.cfg, layer.self_attn
    h = layer.input_layernorm(x)
    q = apply_rope(_heads(attn.q_proj(h), cfg.heads, cfg.head_dim), table)
    k = apply_rope(_heads(attn.k_proj(h), cfg.kv_heads, cfg.head_dim), table)
    v = _heads(attn.v_proj(h), cfg.kv_heads, cfg.head_dim)
    return q, k, v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention in fp32, grouped-query by repeating K/V heads.

    q: [B, H, Sq, Dh]; k, v: [B, KVH, Sk, Dh]; mask: bool [B, 1, Sq, Sk], True = may attend.
    Returns [B, Sq, H * Dh] in q's dtype.
    """
    b, heads, sq, dh = q.shape
    rep = heads // k.shape[1]
    k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, heads, k.shape[2], dh)
    v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, heads, v.shape[2], dh)
    logits = torch.matmul(q.float(), k.float().transpose(2, 3)) * dh**-0.5  # [B, H, Sq, Sk]
    logits = logits.masked_fill(~mask, MASK_FILL)
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, v.float()).to(q.dtype)  # [B, H, Sq, Dh]
    return out.transpose(1, 2).reshape(b, sq, heads * dh)


def layer_finish(layer: GemmaLayer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Residual after attention (o_proj), then pre-norm gated MLP with residual. [B, S, D]."""
    x = x + layer.self_attn.o_proj(attn_out)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def run_stack(model: Gemma, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain (uncached) pass: x [B, S, D], positions [B, S], mask bool [B, 1, S, S] → norm(out)."""
    table = rope(positions, model.cfg.head_dim, model.cfg.rope_base)
    for layer in model.layers:
        q, k, v = layer_qkv(layer, x, table)
        x = layer_finish(layer, x, attend(q, k, v, mask))
    return model.norm(x)
