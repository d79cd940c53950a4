"""An independent BAGEL text-to-image reference for the tests, written from docs/model_facts.md:
stock transformers Qwen3 pieces (projections, per-head norms, apply_rotary_pos_emb,
eager_attention_forward, MLP, RMSNorm) for the MoT layers, diffusers' AutoencoderKL for the
decoder, and the schedule, the CFG combine, the time and position embeddings as the formulas say,
in numpy / plain torch. Nothing here calls walkforge's modelling code; it only reads the weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.models.qwen3 import modeling_qwen3 as hf3

EPS = 1e-8


# ------------------------------------------------------------------ formulas


def schedule(n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(t_0 … t_{N−2} evaluated, dt_k = t_k − t_{k+1} > 0):
    u = linspace(1, 0, N), t = s·u / (1 + (s − 1)·u)."""
    u = np.linspace(1.0, 0.0, n)
    t = shift * u / (1 + (shift - 1) * u)
    return t[:-1], t[:-1] - t[1:]


def guided(
    v_c: np.ndarray,
    v_t: np.ndarray,
    t: float,
    s_t: float,
    s_i: float,
    interval: tuple[float, float],
    kind: str,
    lo: float,
) -> np.ndarray:
    """BAGEL's combine for one image, tokens × channels arrays; v_i = v_c (text-to-image)."""
    if not (interval[0] < t <= interval[1]) or s_t <= 1:
        return v_c
    v_i = v_c
    a = v_t + s_t * (v_c - v_t)
    if kind in ("global", "channel"):
        b = v_i + s_i * (a - v_i) if s_i > 1 else a
        if kind == "global":
            r = np.linalg.norm(v_c) / (np.linalg.norm(b) + EPS)
        else:
            r = np.linalg.norm(v_c, axis=-1, keepdims=True) / (
                np.linalg.norm(b, axis=-1, keepdims=True) + EPS
            )
        return np.clip(r, lo, 1.0) * b
    r = np.linalg.norm(v_c, axis=-1, keepdims=True) / (np.linalg.norm(a, axis=-1, keepdims=True) + EPS)
    a = np.clip(r, lo, 1.0) * a
    return v_i + s_i * (a - v_i) if s_i > 1 else a


def pos_table(side: int, d: int) -> np.ndarray:
    """Row (r, c): [sin(c·ω), cos(c·ω)] ++ [sin(r·ω), cos(r·ω)], ω_i = 10000^(−i/(D/4))."""
    table = np.zeros((side * side, d))
    q = d // 4
    for r in range(side):
        for c in range(side):
            for i in range(q):
                w = 10000.0 ** (-i / q)
                table[r * side + c, [i, q + i, 2 * q + i, 3 * q + i]] = (
                    math.sin(c * w),
                    math.cos(c * w),
                    math.sin(r * w),
                    math.cos(r * w),
                )
    return table


def time_features(t: float) -> torch.Tensor:
    """[cos(t·f_i)] ++ [sin(t·f_i)], f_i = exp(−ln(10000)·i/128): [1, 256]."""
    f = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
    return torch.cat([torch.cos(t * f), torch.sin(t * f)])[None].float()


# ------------------------------------------------------------------ stock blocks


def stock_layers(model, hf_config) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(und, gen) transformers Qwen3 decoder layers per layer, holding `model.llm`'s weights."""
    pairs = []
    for i, layer in enumerate(model.llm.layers):
        state = layer.state_dict()
        experts = []
        for gen in (False, True):
            ref = hf3.Qwen3DecoderLayer(hf_config, layer_idx=i).eval()
            mine = {k.replace("_moe_gen", ""): v for k, v in state.items() if ("_moe_gen" in k) == gen}
            ref.self_attn.o_proj.bias.data.zero_()
            ref.load_state_dict(mine | {"self_attn.o_proj.bias": ref.self_attn.o_proj.bias.data}, strict=True)
            experts.append(ref)
        pairs.append(tuple(experts))
    return pairs


def qkv(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    attn, shape = layer.self_attn, (*x.shape[:2], -1, head_dim)
    h = layer.input_layernorm(x)
    q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
    q, k = hf3.apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, attn.v_proj(h).view(shape).transpose(1, 2)


def finish(layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    x = x + layer.self_attn.o_proj(attn_out)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def joint_attention(module, q, k, v, mask=None) -> torch.Tensor:
    out, _ = hf3.eager_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    return out.reshape(q.shape[0], q.shape[2], -1)


def prefill(layers, rotary, embed: torch.Tensor, ids: list[int], head_dim: int) -> list[tuple]:
    """The und expert over the context, causal: per layer (K after norm and RoPE, V)."""
    x = embed[torch.tensor([ids])]
    pos = torch.arange(len(ids))[None]
    cos, sin = rotary(x, pos)
    causal = torch.full((len(ids), len(ids)), float("-inf")).triu(1)[None, None]
    cache = []
    for und, _ in layers:
        q, k, v = qkv(und, x, cos, sin, head_dim)
        cache.append((k, v))
        x = finish(und, x, joint_attention(und.self_attn, q, k, v, causal))
    return cache


def velocity(model, layers, rotary, final_norm, markers, x_tokens, t, cache, position, head_dim):
    """One evaluation of the query [markers (und), latents (gen)] at one RoPE position over `cache`
    (None: the empty context)."""
    heads = model.time_embedder.mlp
    temb = heads[2](torch.nn.functional.silu(heads[0](time_features(t))))
    side = model.cfg.max_latent_size
    h, w = x_tokens.shape[:2]
    ids = [r * side + c for r in range(h) for c in range(w)]
    table = torch.from_numpy(pos_table(side, model.cfg.llm.width)).float()
    gen = model.vae2llm(x_tokens.reshape(1, h * w, -1)) + temb + table[ids][None]
    und = markers[None]
    cos, sin = rotary(gen, torch.full((1, 1), position))
    for (u_layer, g_layer), past in zip(layers, cache or [None] * len(layers), strict=True):
        (qu, ku, vu), (qg, kg, vg) = (
            qkv(u_layer, und, cos, sin, head_dim),
            qkv(g_layer, gen, cos, sin, head_dim),
        )
        k, v = torch.cat([ku, kg], 2), torch.cat([vu, vg], 2)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        out = joint_attention(u_layer.self_attn, torch.cat([qu, qg], 2), k, v)
        und, gen = finish(u_layer, und, out[:, :2]), finish(g_layer, gen, out[:, 2:])
    return model.llm2vae(final_norm(gen))[0].reshape(h, w, -1)


def generate(
    model,
    diffusers_vae,
    hf_config,
    prompt: list[int],
    noise: torch.Tensor,
    n: int,
    shift: float,
    s_t: float,
    s_i: float,
    interval: tuple[float, float],
    kind: str,
    lo: float,
):
    """Final latents [h, w, 64] and the image [H, W, 3] of the reference (noise: [h, w, 64])."""
    cfg = model.cfg
    layers = stock_layers(model, hf_config)
    rotary = hf3.Qwen3RotaryEmbedding(hf_config)
    final_norm = hf3.Qwen3RMSNorm(cfg.llm.width, cfg.llm.eps)
    final_norm.weight.data.copy_(model.llm.norm_moe_gen.weight)
    embed = model.llm.embed_tokens.weight
    tok = cfg.special_tokens
    context = [tok.bos, *prompt, tok.eos]
    cache = prefill(layers, rotary, embed, context, cfg.llm.head_dim)
    markers = embed[[tok.start_of_image, tok.end_of_image]]
    x = noise.double()
    for t, dt in zip(*schedule(n, shift), strict=True):
        args = (model, layers, rotary, final_norm, markers, x.float(), float(t))
        v_c = velocity(*args, cache, len(context), cfg.llm.head_dim).double().numpy()
        v_t = velocity(*args, None, 0, cfg.llm.head_dim).double().numpy() if s_t > 1 else v_c
        v = guided(v_c.reshape(-1, 64), v_t.reshape(-1, 64), float(t), s_t, s_i, interval, kind, lo)
        x = x - dt * torch.from_numpy(v.reshape(x.shape))
    h, w = x.shape[:2]
    z = torch.einsum("hwpqc->chpwq", x.float().reshape(h, w, 2, 2, 16)).reshape(1, 16, 2 * h, 2 * w)
    y = diffusers_vae.decode(z / cfg.vae_scale + cfg.vae_shift).sample
    return x.float(), (0.5 * y + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
