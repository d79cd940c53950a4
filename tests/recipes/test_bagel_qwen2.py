"""The Qwen2/MoT block (recipes/blocks/qwen2.py) against stock transformers Qwen2 / Qwen3 decoder
layers loaded with the same weights: the und path and the gen path separately, and a mixed
sequence (und markers + gen latents sharing one softmax) against a reference assembled from
transformers' own Qwen3 attention pieces."""

from __future__ import annotations

import pytest
import torch
from tolerances import fp32_tol, rel_err

from walkforge.recipes.blocks.gemma import MASK_FILL, attend, rope
from walkforge.recipes.blocks.qwen2 import Qwen2Config, Qwen2Layer, layer_finish, layer_qkv

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2 import modeling_qwen2 as hf2  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3 as hf3  # noqa: E402

CFG = Qwen2Config(width=48, layers=1, heads=4, kv_heads=2, head_dim=12, mlp=96, rope_base=1e6)
# ours vs transformers, both fp32 torch, relative to the output's scale. The longest sum is the
# 96-term MLP down-projection (1.1e-5 allowed). A norm applied as (1 + w), a missing bias, a
# routed-to-the-wrong-expert weight, a RoPE or GQA slip moves the layer output by 1e-2 and more.
QWEN2_LAYER_TOL = fp32_tol(CFG.mlp)


def hf_config(qk_norm: bool):
    kw = dict(
        hidden_size=CFG.width,
        intermediate_size=CFG.mlp,
        num_hidden_layers=1,
        num_attention_heads=CFG.heads,
        num_key_value_heads=CFG.kv_heads,
        rms_norm_eps=CFG.eps,
        rope_theta=CFG.rope_base,
        vocab_size=10,
        attn_implementation="eager",
    )
    if qk_norm:
        return transformers.Qwen3Config(head_dim=CFG.head_dim, attention_bias=True, **kw)
    return transformers.Qwen2Config(**kw)


def hf_layer(qk_norm: bool, seed: int):
    """A stock decoder layer, every parameter random (norms off 1, biases off 0); Qwen3's o_proj
    bias (BAGEL's o_proj has none) is zero."""
    torch.manual_seed(seed)
    mod = hf3 if qk_norm else hf2
    cls = mod.Qwen3DecoderLayer if qk_norm else mod.Qwen2DecoderLayer
    layer = cls(hf_config(qk_norm), layer_idx=0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(
                torch.randn(p.shape) * (0.3 if "norm" in name else 0.2) + (1.0 if "norm" in name else 0.0)
            )
        if qk_norm:
            layer.self_attn.o_proj.bias.zero_()
    return layer


def load_expert(ours: Qwen2Layer, ref, suffix: str) -> None:
    """Copy a stock layer's weights into one expert of ours (`suffix`: "" und, "_moe_gen" gen)."""
    state = {}
    for key, value in ref.state_dict().items():
        if key == "self_attn.o_proj.bias":
            continue
        head, leaf = key.rsplit(".", 1)
        parts = head.split(".")
        parts[-1 if parts[0] == "self_attn" else 0] += suffix
        state[".".join(parts) + "." + leaf] = value
    missing = ours.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys


def mot_layer(qk_norm: bool) -> tuple[Qwen2Layer, object, object]:
    cfg = Qwen2Config(**{**CFG.__dict__, "qk_norm": qk_norm})
    ours = Qwen2Layer(cfg).eval()
    und, gen = hf_layer(qk_norm, seed=1), hf_layer(qk_norm, seed=2)
    load_expert(ours, und, "")
    load_expert(ours, gen, "_moe_gen")
    return ours, und, gen


def causal_mask(s: int) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool).tril()[None, None]


def ours_forward(
    layer: Qwen2Layer, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, expert: str
) -> torch.Tensor:
    table = rope(positions, layer.cfg.head_dim, layer.cfg.rope_base)
    q, k, v = layer_qkv(layer, x, table, expert)
    return layer_finish(layer, x, attend(q, k, v, mask), expert)


def hf_forward(
    ref, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, qk_norm: bool
) -> torch.Tensor:
    rotary = (hf3.Qwen3RotaryEmbedding if qk_norm else hf2.Qwen2RotaryEmbedding)(hf_config(qk_norm))
    additive = torch.zeros(mask.shape).masked_fill(~mask, MASK_FILL)
    out = ref(x, attention_mask=additive, position_embeddings=rotary(x, positions))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qwen3-qknorm", "qwen2"])
@pytest.mark.parametrize("expert", ["und", "gen"])
def test_each_expert_matches_a_stock_layer(qk_norm: bool, expert: str) -> None:
    ours, und, gen = mot_layer(qk_norm)
    ref = und if expert == "und" else gen
    x = torch.randn(2, 7, CFG.width, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(7)[None].expand(2, -1) + torch.tensor([[0], [5]])  # offset RoPE positions
    with torch.no_grad():
        got = ours_forward(ours, x, positions, causal_mask(7), expert)
        want = hf_forward(ref, x, positions, causal_mask(7), qk_norm)
        other = hf_forward(gen if expert == "und" else und, x, positions, causal_mask(7), qk_norm)
    assert rel_err(got, want) <= QWEN2_LAYER_TOL
    assert rel_err(got, other) > 1e-2  # the two experts really differ: routing is tested


def test_mixed_sequence_matches_a_reference_from_stock_pieces() -> None:
    """Markers (und) and latents (gen) in one non-causal softmax, all at one RoPE position, as
    BAGEL's generation query is: the reference uses transformers' Qwen3 projections, norms,
    apply_rotary_pos_emb and eager_attention_forward."""
    ours, und, gen = mot_layer(True)
    gen_x = torch.randn(1, 6, CFG.width, generator=torch.Generator().manual_seed(4))
    und_x = torch.randn(1, 2, CFG.width, generator=torch.Generator().manual_seed(5))
    pos = torch.full((1, 8), 9)
    with torch.no_grad():
        table = rope(pos, CFG.head_dim, CFG.rope_base)
        qu, ku, vu = layer_qkv(ours, und_x, (table[0][:, :2], table[1][:, :2]), "und")
        qg, kg, vg = layer_qkv(ours, gen_x, (table[0][:, 2:], table[1][:, 2:]), "gen")
        out = attend(
            torch.cat([qu, qg], 2),
            torch.cat([ku, kg], 2),
            torch.cat([vu, vg], 2),
            torch.ones(1, 1, 8, 8, dtype=torch.bool),
        )
        got_u, got_g = (
            layer_finish(ours, und_x, out[:, :2], "und"),
            layer_finish(ours, gen_x, out[:, 2:], "gen"),
        )
        want_u, want_g = stock_mixed(und, gen, und_x, gen_x, pos)
    assert rel_err(got_u, want_u) <= QWEN2_LAYER_TOL
    assert rel_err(got_g, want_g) <= QWEN2_LAYER_TOL


def stock_mixed(und, gen, und_x: torch.Tensor, gen_x: torch.Tensor, pos: torch.Tensor):
    """One MoT layer from transformers' Qwen3 pieces: each expert's q/k/v + norms, one joint
    eager attention (no mask), each expert's o_proj, post-norm and MLP."""
    cos, sin = hf3.Qwen3RotaryEmbedding(hf_config(True))(gen_x, pos)

    def qkv(layer, x):
        attn, shape = layer.self_attn, (*x.shape[:2], -1, CFG.head_dim)
        h = layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
        return q, k, attn.v_proj(h).view(shape).transpose(1, 2)

    (qu, ku, vu), (qg, kg, vg) = qkv(und, und_x), qkv(gen, gen_x)
    q, k = hf3.apply_rotary_pos_emb(torch.cat([qu, qg], 2), torch.cat([ku, kg], 2), cos, sin)
    out, _ = hf3.eager_attention_forward(
        und.self_attn, q, k, torch.cat([vu, vg], 2), None, scaling=CFG.head_dim**-0.5
    )
    out = out.reshape(1, 8, -1)

    def finish(layer, x, o):
        x = x + layer.self_attn.o_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    return finish(und, und_x, out[:, :2]), finish(gen, gen_x, out[:, 2:])
