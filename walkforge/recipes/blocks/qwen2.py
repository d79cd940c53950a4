"""Qwen2 decoder blocks with BAGEL's Mixture-of-Transformers (MoT) "und" / "gen" experts.

Module names match BAGEL's `Qwen2Model` state dict (`embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`,
`layers.N.self_attn.{q,k}_norm`, `layers.N.mlp.{gate,up,down}_proj`, `layers.N.{input,
post_attention}_layernorm`, `norm`) and, with `Qwen2Config.moe_gen`, the generation expert's copy of
every one of them under the same name plus `_moe_gen` (`self_attn.q_proj_moe_gen`, `mlp_moe_gen`,
`input_layernorm_moe_gen`, `norm_moe_gen`, …). A token is routed to one expert for every weight of
a layer; the experts meet only in attention, where all tokens share one softmax.

As in recipes/blocks/gemma.py a layer is split so the caller decides what it attends to:

    q, k, v = layer_qkv(layer, x, rope, expert)    # pre-norm, q/k/v (bias), per-head q/k RMSNorm, RoPE
    out = attend(q, k_all, v_all, mask)            # gemma.attend, or PagedAttention over a cache
    x = layer_finish(layer, x, out, expert)        # o_proj + residual, SwiGLU MLP + residual

RoPE (rotate-half, θ^(−2i/Dh)), the fp32 RMS statistics and the attention are Gemma's own
functions; only the norm's weighting differs (Qwen2: x̂·w, Gemma: x̂·(1 + w)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from walkforge.recipes.blocks.gemma import apply_rope, attend, rope, split_heads
from walkforge.recipes.blocks.llama import LlamaMLP as Qwen2MLP  # SwiGLU, no biases: the same module
from walkforge.recipes.blocks.llama import LlamaRMSNorm as Qwen2RMSNorm  # w · x / rms(x): the same

EXPERTS = {"und": "", "gen": "_moe_gen"}
"""Expert name → the suffix its weights carry (BAGEL's naming)."""


@dataclass(frozen=True)
class Qwen2Config:
    """Sizes of a Qwen2 stack. `qk_norm`: per-head RMSNorm of q and k before RoPE (BAGEL, Qwen3);
    `moe_gen`: every layer and the final norm also hold the generation expert's weights."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int = 0
    eps: float = 1e-6
    rope_base: float = 1e6
    qk_norm: bool = True
    moe_gen: bool = True


class Qwen2Attention(nn.Module):
    """q/k/v projections with bias, o_proj without, optional per-head q/k norms; per expert."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        for suffix in _suffixes(cfg):
            self.add_module("q_proj" + suffix, nn.Linear(cfg.width, q))
            self.add_module("k_proj" + suffix, nn.Linear(cfg.width, kv))
            self.add_module("v_proj" + suffix, nn.Linear(cfg.width, kv))
            self.add_module("o_proj" + suffix, nn.Linear(q, cfg.width, bias=False))
            if cfg.qk_norm:
                self.add_module("q_norm" + suffix, Qwen2RMSNorm(cfg.head_dim, cfg.eps))
                self.add_module("k_norm" + suffix, Qwen2RMSNorm(cfg.head_dim, cfg.eps))


class Qwen2Layer(nn.Module):
    """One pre-norm decoder layer (both experts' weights under MoT); run it with `layer_qkv` →
    attention → `layer_finish`."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.self_attn = Qwen2Attention(cfg)
        for suffix in _suffixes(cfg):
            self.add_module("mlp" + suffix, Qwen2MLP(cfg))
            self.add_module("input_layernorm" + suffix, Qwen2RMSNorm(cfg.width, cfg.eps))
            self.add_module("post_attention_layernorm" + suffix, Qwen2RMSNorm(cfg.width, cfg.eps))


class Qwen2(nn.Module):
    """A Qwen2 (MoT) stack: optional `embed_tokens` (not scaled), `layers`, final `norm`(`_moe_gen`)."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.vocab > 0:
            self.embed_tokens = nn.Embedding(cfg.vocab, cfg.width)
        self.layers = nn.ModuleList(Qwen2Layer(cfg) for _ in range(cfg.layers))
        for suffix in _suffixes(cfg):
            self.add_module("norm" + suffix, Qwen2RMSNorm(cfg.width, cfg.eps))

    def final_norm(self, x: torch.Tensor, expert: str = "und") -> torch.Tensor:
        return getattr(self, "norm" + _suffix(self.cfg, expert))(x)


def _suffixes(cfg: Qwen2Config) -> tuple[str, ...]:
    return tuple(EXPERTS.values()) if cfg.moe_gen else ("",)


def _suffix(cfg: Qwen2Config, expert: str) -> str:
    if expert not in EXPERTS or (expert == "gen" and not cfg.moe_gen):
        raise ValueError(f"no expert '{expert}' in this Qwen2 stack (moe_gen={cfg.moe_gen})")
    return EXPERTS[expert]


def layer_qkv(
    layer: Qwen2Layer, x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor], expert: str = "und"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-norm and project x [B, S, D] with `expert`'s weights to q [B, H, S, Dh], k and v
    [B, KVH, S, Dh]; q and k are RMS-normed per head (qk_norm) and then rotated by `table`
    (`gemma.rope(positions, …)`). k is what a KV cache stores."""
    cfg, attn, s = layer.cfg, layer.self_attn, _suffix(layer.cfg, expert)
    h = getattr(layer, "input_layernorm" + s)(x)
    q = split_heads(getattr(attn, "q_proj" + s)(h), cfg.heads, cfg.head_dim)
    k = split_heads(getattr(attn, "k_proj" + s)(h), cfg.kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = getattr(attn, "q_norm" + s)(q), getattr(attn, "k_norm" + s)(k)
    v = split_heads(getattr(attn, "v_proj" + s)(h), cfg.kv_heads, cfg.head_dim)
    return apply_rope(q, table), apply_rope(k, table), v


def layer_finish(
    layer: Qwen2Layer, x: torch.Tensor, attn_out: torch.Tensor, expert: str = "und"
) -> torch.Tensor:
    """x + o_proj(attn_out), then x + mlp(post_attention_layernorm(x)), all `expert`'s. [B, S, D]."""
    s = _suffix(layer.cfg, expert)
    x = x + getattr(layer.self_attn, "o_proj" + s)(attn_out)
    return x + getattr(layer, "mlp" + s)(getattr(layer, "post_attention_layernorm" + s)(x))


def run_stack(
    model: Qwen2, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, expert: str = "und"
) -> torch.Tensor:
    """Plain (uncached) pass of one expert: x [B, S, D], positions [B, S], mask bool [B, 1, S, S]
    → final norm(out)."""
    table = rope(positions, model.cfg.head_dim, model.cfg.rope_base)
    for layer in model.layers:
        q, k, v = layer_qkv(layer, x, table, expert)
        x = layer_finish(layer, x, attend(q, k, v, mask), expert)
    return model.final_norm(x, expert)
