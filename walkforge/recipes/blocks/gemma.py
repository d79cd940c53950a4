"""Gemma decoder blocks, shared by every recipe that runs a Gemma language model or expert.

Module names match transformers' `GemmaModel` state dict (`embed_tokens`, `layers.N.self_attn.
{q,k,v,o}_proj`, `layers.N.mlp.{gate,up,down}_proj`, `layers.N.{input,post_attention}_layernorm`,
`norm`), so a checkpoint maps onto it by prefix alone.

A layer is split in two so that callers can decide what a layer attends to (its own tokens,
or a cached prefix followed by its own tokens):

    q, k, v = layer_qkv(layer, x, rope)        # pre-norm, projections, RoPE
    out = attend(q, k_all, v_all, mask)        # the one attention function
    x = layer_finish(layer, x, out)            # o_proj + residual, MLP + residual

adaRMS (pi0.5's action expert, `GemmaConfig.cond_dim` > 0): every norm, the final one too, is
conditioned on a vector `cond` [B, cond_dim] passed to `layer_qkv` / `layer_finish` / the norm:
(scale, shift, gate) = split(dense(cond), 3), y = rmsnorm(x)·(1 + scale) + shift, and each residual
adds sublayer(y)·gate. Without `cond` the code path is the plain Gemma one, unchanged.

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
    """Sizes of a Gemma stack. `vocab = 0` builds no token embedding (an action expert);
    `cond_dim` > 0 makes every norm adaRMS, conditioned on a [B, cond_dim] vector (pi0.5)."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int = 0
    eps: float = 1e-6
    rope_base: float = 10000.0
    cond_dim: int = 0


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim, in fp32 (the part Gemma's and Qwen2's RMSNorm share)."""
    h = x.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + w), computed in fp32 and cast back.

    With `cond_dim` > 0 it is adaRMS: no `weight` but `dense` (cond_dim → 3·dim), and
    y = x / rms(x) * (1 + scale) + shift with (scale, shift, gate) = split(dense(cond), 3).
    """

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int = 0) -> None:
        super().__init__()
        self.eps = eps
        if cond_dim > 0:
            self.dense = nn.Linear(cond_dim, 3 * dim)
        else:
            self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = rms_normalize(x, self.eps)
        if cond is None:
            return (h * (1.0 + self.weight.float())).type_as(x)
        scale, shift, _ = self.modulation(cond)
        return (h * (1.0 + scale.float()) + shift.float()).type_as(x)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """adaRMS (scale, shift, gate), each [B, 1, dim], from cond [B, cond_dim]. (Static slices,
        not `chunk`: that exports as a SplitToSequence, which TensorRT does not take.)"""
        m, d = self.dense(cond)[:, None], self.dense.out_features // 3
        return m[..., :d], m[..., d : 2 * d], m[..., 2 * d :]

    def gated(self, y: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """A sublayer's output y [B, S, dim] as its residual adds it: y·gate under adaRMS, else y."""
        return y if cond is None else y * self.modulation(cond)[2]


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
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps, cfg.cond_dim)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps, cfg.cond_dim)


class Gemma(nn.Module):
    """A Gemma stack: optional `embed_tokens`, `layers`, final `norm`."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.vocab > 0:
            self.embed_tokens = nn.Embedding(cfg.vocab, cfg.width)
        self.layers = nn.ModuleList(GemmaLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width, cfg.eps, cfg.cond_dim)

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


def split_heads(x: torch.Tensor, n: int, head_dim: int) -> torch.Tensor:
    # [B, S, n * Dh] -> [B, n, S, Dh]
    return x.reshape(x.shape[0], x.shape[1], n, head_dim).transpose(1, 2)


def layer_qkv(layer: GemmaLayer, x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor],
              cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-norm and project x [B, S, D] to q [B, H, S, Dh], k and v [B, KVH, S, Dh].

    RoPE (from `rope(positions, …)`) is applied to q and k; k is what a KV cache stores.
    `cond` [B, cond_dim]: the adaRMS conditioning of a `cond_dim` > 0 stack.
    """
    cfg, attn = layer.cfg, layer.self_attn
    h = layer.input_layernorm(x, cond)
    q = apply_rope(split_heads(attn.q_proj(h), cfg.heads, cfg.head_dim), table)
    k = apply_rope(split_heads(attn.k_proj(h), cfg.kv_heads, cfg.head_dim), table)
    v = split_heads(attn.v_proj(h), cfg.kv_heads, cfg.head_dim)
    return q, k, v


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask (True = may attend) as the fp32 bias added to logits: 0 or MASK_FILL. Adding it
    equals `masked_fill(~mask, MASK_FILL)` bit for bit (a logit of |x| < 1e30 vanishes against
    MASK_FILL's ulp of 2e31), and onnxruntime broadcasts an Add over the heads much faster than a
    Where (docs/benchmarks.md, 0.3.1)."""
    return torch.where(mask, 0.0, MASK_FILL)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention in fp32, grouped-query: the G = H / KVH query heads of a K/V head
    are one [G·Sq, Dh] matmul against it (no K/V copies per head).

    q: [B, H, Sq, Dh]; k, v: [B, KVH, Sk, Dh]; mask: bool [B, 1, Sq, Sk], True = may attend.
    Returns [B, Sq, H * Dh] in q's dtype.
    """
    b, heads, sq, dh = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    grouped = q.float().reshape(b, kv_heads, -1, dh)  # [B, KVH, G·Sq, Dh]
    logits = torch.matmul(grouped, k.float().transpose(2, 3)) * dh**-0.5  # [B, KVH, G·Sq, Sk]
    logits = logits.reshape(b, kv_heads, -1, sq, sk) + mask_bias(mask)[:, :, None]  # [B, KVH, G, Sq, Sk]
    probs = torch.softmax(logits, dim=-1).reshape(b, kv_heads, -1, sk)
    out = torch.matmul(probs, v.float()).reshape(b, heads, sq, dh).to(q.dtype)  # [B, H, Sq, Dh]
    return out.transpose(1, 2).reshape(b, sq, heads * dh)


def layer_finish(layer: GemmaLayer, x: torch.Tensor, attn_out: torch.Tensor,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
    """Residual after attention (o_proj), then pre-norm gated MLP with residual. [B, S, D].

    Under adaRMS (`cond` given) each residual adds its sublayer's output times its norm's gate.
    """
    pre, post = layer.input_layernorm, layer.post_attention_layernorm
    x = x + pre.gated(layer.self_attn.o_proj(attn_out), cond)
    return x + post.gated(layer.mlp(post(x, cond)), cond)


def run_stack(model: Gemma, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
              cond: torch.Tensor | None = None) -> torch.Tensor:
    """Plain (uncached) pass: x [B, S, D], positions [B, S], mask bool [B, 1, S, S] → norm(out).
    `cond` [B, cond_dim] conditions an adaRMS stack (its final norm's gate is unused)."""
    table = rope(positions, model.cfg.head_dim, model.cfg.rope_base)
    for layer in model.layers:
        q, k, v = layer_qkv(layer, x, table, cond)
        x = layer_finish(layer, x, attend(q, k, v, mask), cond)
    return model.norm(x, cond)
