"""SmolVLA: parity with stock transformers blocks and with a reference written from LeRobot
v0.6.1's formulas, the paged walks against the dense eager path, the cross K/V computed once,
the key map, configs and walk contracts. Random weights, CPU."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import rel_err
from torch import nn

from walkforge.plugins.constants import PAGE_SIZE, kv_pages
from walkforge.recipes import get_recipe
from walkforge.recipes.blocks.flow import make_attention_mask
from walkforge.recipes.blocks.llama import LlamaConfig
from walkforge.recipes.configs import from_dict, to_dict
from walkforge.recipes.smolvla.checkpoint import KEY_MAP, VLM, smolvla_config
from walkforge.recipes.smolvla.config import SmolVLAConfig
from walkforge.recipes.smolvla.model import SmolVLAModel
from walkforge.recipes.weights import load_strict

transformers = pytest.importorskip("transformers")

# rel_err (max|got − want| / max|want|) per stage, fp32 against fp32 (measured max errors in the
# comments). The longest sums: vision, the 4·4·3-term patch embedding and 2·64-term MLPs; prefix
# K/V, attention over 49 prefix tokens; actions, 10 Euler steps through 2 expert layers; paged,
# the same maths through the PagedAttention / KVCacheWrite references (summation order only).
# A mask, RoPE-position, pixel-shuffle-order or √width slip moves these by 1e-2 and more.
TOL = {"vision": 1e-5, "prefix_kv": 1e-5, "actions": 1e-4, "paged": 1e-5}
SMOLVLA = get_recipe("smolvla")
CFG = SMOLVLA.variant("tiny")


def random_model(cfg: SmolVLAConfig) -> SmolVLAModel:
    """`cfg`'s modules with every parameter random, norms and biases included."""
    torch.manual_seed(0)
    m = SMOLVLA.build(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.3 if "norm" in name
                        else torch.randn(p.shape, generator=gen) * 0.3)
    return m


@pytest.fixture(scope="module")
def model() -> SmolVLAModel:
    return random_model(CFG)


def torch_inputs(cfg: SmolVLAConfig = CFG, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in SMOLVLA.fake_inputs(cfg, batch=batch, seed=seed).items()}


# --- stock transformers blocks ----------------------------------------------------------------

def hf_llama(g: LlamaConfig, vocab: int) -> nn.Module:
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=g.width, intermediate_size=g.mlp, num_hidden_layers=g.layers,
        num_attention_heads=g.heads, num_key_value_heads=g.kv_heads, head_dim=g.head_dim, rms_norm_eps=g.eps,
        rope_theta=10000.0, attn_implementation="eager")).eval()  # LeRobot's RoPE base, not SmolVLM2's 1e5


def hf_smolvlm(model: SmolVLAModel) -> nn.Module:
    """Stock `SmolVLMModel` with `model`'s VLM weights, loaded through the checkpoint key map."""
    cfg = model.cfg
    v, t = cfg.vision, cfg.llm
    hf = transformers.SmolVLMModel(transformers.SmolVLMConfig(
        vision_config={"hidden_size": v.width, "intermediate_size": v.mlp, "num_hidden_layers": v.layers,
                       "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch,
                       "layer_norm_eps": v.eps},
        text_config={"model_type": "llama", "hidden_size": t.width, "intermediate_size": t.mlp,
                     "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                     "num_key_value_heads": t.kv_heads, "head_dim": t.head_dim, "vocab_size": t.vocab,
                     "rms_norm_eps": t.eps, "rope_theta": 10000.0},
        scale_factor=cfg.scale_factor, attn_implementation="eager")).eval()
    ours = {KEY_MAP.to_checkpoint(k): p for k, p in model.state_dict().items()}
    hf.load_state_dict({k[len(VLM):]: p for k, p in ours.items() if k.startswith(VLM)}, strict=True)
    return hf


@pytest.mark.parametrize("scale", [2, 4])
def test_vision_and_connector_match_transformers_smolvlm(scale: int) -> None:
    cfg = replace(CFG, scale_factor=scale)
    model = random_model(cfg)
    hf = hf_smolvlm(model)
    images = torch_inputs(cfg)["images"]
    with torch.no_grad():
        got = model.embed_images(images)
        pixels = images.flatten(0, 1) * 2 - 1
        want = hf.connector(hf.vision_model(pixel_values=pixels).last_hidden_state)
    assert got.shape == (2, cfg.num_views * cfg.image_tokens, cfg.llm.width)
    assert rel_err(got, want.reshape(got.shape)) <= TOL["vision"]  # measured: 0 (identical) at s = 2 and 4


def additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None]


def test_prefix_kv_matches_transformers_llama(model: SmolVLAModel) -> None:
    x = torch_inputs()
    llm = hf_llama(CFG.llm, CFG.llm.vocab)
    llm.load_state_dict(model.llm.state_dict(), strict=True)
    with torch.no_grad():
        tokens = model.embed_images(x["images"])
        prefix, pad, ar = model.embed_prefix(tokens, x["image_masks"], x["prompt_ids"], x["prompt_mask"],
                                             x["state"])
        cache = llm(inputs_embeds=prefix, attention_mask=additive(make_attention_mask(pad, ar)),
                    position_ids=pad.long().cumsum(-1) - 1, use_cache=True).past_key_values
        k, v, _ = model.prefill(tokens, x["image_masks"], x["prompt_ids"], x["prompt_mask"], x["state"])
    assert not pad.all() and k.shape[0] == CFG.llm.layers
    for i, layer in enumerate(cache.layers):  # measured: 0 (identical)
        assert rel_err(k[i], layer.keys) <= TOL["prefix_kv"]
        assert rel_err(v[i], layer.values) <= TOL["prefix_kv"]


# --- LeRobot's formulas (smolvlm_with_expert.py / modeling_smolvla.py, v0.6.1) -------------------

def lerobot_rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: float = 10_000) -> torch.Tensor:
    """x [B, L, H, D] at positions [B, L]: split halves, angle = pos / wavelength^(2i/D)."""
    half = x.shape[-1] // 2
    timescale = max_wavelength ** ((2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32))
    radians = (positions[..., None].float() / timescale)[..., None, :]
    x1, x2 = x.split(half, dim=-1)
    return torch.cat([x1 * radians.cos() - x2 * radians.sin(), x2 * radians.cos() + x1 * radians.sin()], -1)


def lerobot_attention(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eager_attention_forward: K/V heads repeated per group, where(mask, w, finfo.min), softmax."""
    b, n, heads, d = q.shape
    groups = heads // k.shape[2]
    k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
    w = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * d**-0.5
    w = torch.where(mask[:, None], w, torch.finfo(torch.float32).min)
    out = torch.matmul(F.softmax(w, dim=-1), v.permute(0, 2, 1, 3))
    return out.permute(0, 2, 1, 3).reshape(b, n, heads * d)


def heads(linear: nn.Module, h: torch.Tensor, head_dim: int) -> torch.Tensor:
    return linear(h).view(*h.shape[:-1], -1, head_dim)


def finish(layer: nn.Module, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    h = layer.self_attn.o_proj(att) + h
    return layer.mlp(layer.post_attention_layernorm(h)) + h


def att_2d(pad: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    cum = ar.long().cumsum(1)
    return (cum[:, None, :] <= cum[:, :, None]) & pad[:, None, :] & pad[:, :, None]


def sinusoid(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """create_sinusoidal_pos_embedding: periods min…max on a log scale, in float64."""
    period = min_period * (max_period / min_period) ** torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    x = (1.0 / period * 2 * math.pi)[None] * t[:, None]
    return torch.cat([torch.sin(x), torch.cos(x)], 1).float()


def hf_expert(model: SmolVLAModel) -> nn.Module:
    """The expert as LeRobot builds it: a LlamaModel whose cross layers' k/v_proj take the VLM's K/V."""
    cfg = model.cfg
    expert = hf_llama(cfg.expert, 8)
    kv = cfg.llm.kv_heads * cfg.llm.head_dim
    for i in cfg.cross_layers:
        attn = expert.layers[i].self_attn
        attn.k_proj, attn.v_proj = nn.Linear(kv, kv, bias=False), nn.Linear(kv, kv, bias=False)
    result = expert.load_state_dict(model.expert.state_dict(), strict=False)
    assert result.missing_keys == ["embed_tokens.weight"] and not result.unexpected_keys
    return expert


def lerobot_prefix(model: SmolVLAModel, vlm: nn.Module, x: dict[str, torch.Tensor]
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """embed_prefix (cameras in order, × √D; prompt × √D; the state token, ar 1), one VLM pass:
    each layer's post-RoPE K and V [B, P, KVH, D], and the pad mask."""
    embs, pads, b = [], [], x["state"].shape[0]
    for cam in range(x["images"].shape[1]):
        e = vlm.connector(vlm.vision_model(pixel_values=x["images"][:, cam] * 2 - 1).last_hidden_state)
        embs.append(e * torch.tensor(e.shape[-1] ** 0.5))
        pads.append(x["image_masks"][:, cam, None].expand(b, e.shape[1]))
    lang = vlm.text_model.embed_tokens(x["prompt_ids"])
    embs += [lang * math.sqrt(lang.shape[-1]), model.state_proj(x["state"])[:, None]]
    pads += [x["prompt_mask"], torch.ones(b, 1, dtype=torch.bool)]
    h, pad = torch.cat(embs, 1), torch.cat(pads, 1)
    ar = torch.zeros_like(pad)
    ar[:, -1] = True
    mask, positions, cache = att_2d(pad, ar), pad.long().cumsum(1) - 1, []
    for layer in vlm.text_model.layers:
        hn, d = layer.input_layernorm(h), model.cfg.llm.head_dim
        q = lerobot_rope(heads(layer.self_attn.q_proj, hn, d), positions)
        k = lerobot_rope(heads(layer.self_attn.k_proj, hn, d), positions)
        v = heads(layer.self_attn.v_proj, hn, d)
        cache.append((k, v))
        h = finish(layer, h, lerobot_attention(mask, q, k, v))
    return cache, pad


def lerobot_velocity(model: SmolVLAModel, expert: nn.Module, cache: list, pad: torch.Tensor,
                     x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """denoise_step: embed_suffix (ar all 1), then per layer forward_attn_layer (own K/V appended
    to the cache) or forward_cross_attn_layer (k/v_proj of the cached K/V, recomputed every step)."""
    cfg, d = model.cfg, model.cfg.expert.head_dim
    a = model.action_in_proj(x_t)
    a = torch.cat([a, sinusoid(t, a.shape[-1])[:, None].expand_as(a)], 2)
    h = model.action_time_mlp_out(F.silu(model.action_time_mlp_in(a)))
    b, n = h.shape[:2]
    suffix_pad = torch.ones(b, n, dtype=torch.bool)
    full = torch.cat([pad[:, None].expand(b, n, -1), att_2d(suffix_pad, suffix_pad)], 2)
    positions = pad.sum(1, keepdim=True) + suffix_pad.long().cumsum(1) - 1
    for i, layer in enumerate(expert.layers):
        hn, (pk, pv) = layer.input_layernorm(h), cache[i]
        if i % cfg.self_attn_every_n_layers == 0:
            q = lerobot_rope(heads(layer.self_attn.q_proj, hn, d), positions)
            k = torch.cat([pk, lerobot_rope(heads(layer.self_attn.k_proj, hn, d), positions)], 1)
            v = torch.cat([pv, heads(layer.self_attn.v_proj, hn, d)], 1)
            att = lerobot_attention(full, q, k, v)
        else:
            from_zero = positions - positions.min(1, keepdim=True).values
            q = lerobot_rope(heads(layer.self_attn.q_proj, hn, d), from_zero)
            k = heads(layer.self_attn.k_proj, pk.reshape(*pk.shape[:2], -1), d)
            v = heads(layer.self_attn.v_proj, pv.reshape(*pv.shape[:2], -1), d)
            att = lerobot_attention(full[:, :, : k.shape[1]], q, k, v)
        h = finish(layer, h, att)
    return model.action_out_proj(expert.norm(h)[:, -cfg.action_horizon:])


@pytest.mark.parametrize("layers", [2, 4])
def test_sample_actions_match_lerobot_reference(layers: int) -> None:
    cfg = replace(CFG, llm=replace(CFG.llm, layers=layers), expert=replace(CFG.expert, layers=layers))
    model = random_model(cfg)
    x = torch_inputs(cfg)
    assert not x["image_masks"].all() and x["prompt_mask"].sum(1).unique().numel() == 2
    with torch.no_grad():
        vlm, expert = hf_smolvlm(model), hf_expert(model)
        cache, pad = lerobot_prefix(model, vlm, x)
        want, dt = x["noise"], -1.0 / cfg.num_steps
        for step in range(cfg.num_steps):
            t = torch.tensor(1.0 + step * dt, dtype=torch.float32).expand(want.shape[0])
            want = want + dt * lerobot_velocity(model, expert, cache, pad, want, t)
        got = model.sample_actions(x["images"], x["image_masks"], x["prompt_ids"], x["prompt_mask"],
                                   x["state"], x["noise"])
    assert got.shape == (2, cfg.action_horizon, cfg.action_dim)
    assert rel_err(got, want) <= TOL["actions"]  # measured: 1.2e-7 (2 layers), 1.9e-7 (4)
    assert rel_err(got, x["noise"]) > 1e-2  # the steps moved the noise (by O(1))


# --- the paged walks ---------------------------------------------------------------------------

def paged_actions(model: SmolVLAModel, x: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """vision → prefill_paged → `steps` × denoise, the walks' modules run eagerly with the
    registered ops, over a random pool whose pages are handed out out of order."""
    cfg = model.cfg
    seq = SMOLVLA.walks(model, cfg)
    b, pages = x["state"].shape[0], kv_pages(cfg.prefix_len)
    pool_shape = (cfg.pool_layers, 2, b * pages + 1, PAGE_SIZE, cfg.llm.kv_heads, cfg.llm.head_dim)
    pool = torch.randn(pool_shape, generator=torch.Generator().manual_seed(3))
    order = torch.randperm(b * pages + 1, generator=torch.Generator().manual_seed(4))
    table = order[: b * pages].reshape(b, pages)
    scales = torch.ones(cfg.pool_layers, 2)
    tokens = seq.node("vision").module(x["images"])
    pool, lengths = seq.node("prefill").module(tokens, x["image_masks"], x["prompt_ids"], x["prompt_mask"],
                                               x["state"], pool, table, scales)
    act, dt = x["noise"], torch.tensor([-1.0 / steps])
    for k in range(steps):
        t = torch.full((b,), 1.0 - k / steps)
        act = seq.node("denoise").module(act, t, dt, pool, table, lengths, scales)
    return act


def test_paged_walks_match_dense_sample(model: SmolVLAModel) -> None:
    x = torch_inputs(batch=3, seed=2)
    assert not x["image_masks"].all() and x["prompt_mask"].sum(1).unique().numel() == 3
    with torch.no_grad():
        want = model.sample_actions(x["images"], x["image_masks"], x["prompt_ids"], x["prompt_mask"],
                                    x["state"], x["noise"])
        got = paged_actions(model, x, CFG.num_steps)
    assert rel_err(got, want) <= TOL["paged"]  # measured: 1.6e-7


def test_cross_kv_computed_once_per_chunk(model: SmolVLAModel) -> None:
    calls = {"cross": 0, "self": 0}

    def counter(kind: str):
        return lambda *_: calls.__setitem__(kind, calls[kind] + 1)

    kinds = ["cross" if i in CFG.cross_layers else "self" for i in range(CFG.expert.layers)]
    hooks = [layer.self_attn.k_proj.register_forward_hook(counter(kind))
             for kind, layer in zip(kinds, model.expert.layers, strict=True)]
    try:
        with torch.no_grad():
            paged_actions(model, torch_inputs(), steps=10)
    finally:
        for hook in hooks:
            hook.remove()
    n_cross = len(CFG.cross_layers)
    assert n_cross >= 1 and calls["cross"] == n_cross  # in prefill, not in the 10 steps
    assert calls["self"] == 10 * (CFG.expert.layers - n_cross)


# --- weights, configs, walk contracts -------------------------------------------------------------

def test_key_map_loads_lerobot_layout_strictly(model: SmolVLAModel) -> None:
    tensors = {KEY_MAP.to_checkpoint(k): v.clone() for k, v in model.state_dict().items()}
    tensors["model.vlm_with_expert.vlm.lm_head.weight"] = torch.randn(CFG.llm.vocab, CFG.llm.width)
    kv = CFG.llm.kv_heads * CFG.llm.head_dim
    expert = "model.vlm_with_expert.lm_expert.layers."
    assert tensors[expert + "1.self_attn.k_proj.weight"].shape == (kv, kv)  # a cross layer: the VLM's K in
    assert tensors[expert + "0.self_attn.k_proj.weight"].shape == (kv, CFG.expert.width)
    assert {VLM + "connector.modality_projection.proj.weight", "model.state_proj.weight"} < set(tensors)
    loaded = SMOLVLA.build(CFG)
    assert load_strict(loaded, tensors, KEY_MAP) == {"loaded": len(model.state_dict()), "ignored": 1}
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


# SmolVLM2-500M-Video-Instruct's config.json as far as the config reads it (sources: config.py)
SMOLVLM2_500M = {
    "scale_factor": 4,
    "vision_config": {"hidden_size": 768, "image_size": 512, "patch_size": 16, "num_attention_heads": 12,
                      "intermediate_size": 3072, "num_hidden_layers": 12, "model_type": "smolvlm_vision"},
    "text_config": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                    "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64, "vocab_size": 49280,
                    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "model_type": "llama"},
}
SMOLVLA_BASE = {
    "type": "smolvla", "chunk_size": 50, "max_state_dim": 32, "max_action_dim": 32, "num_steps": 10,
    "tokenizer_max_length": 48, "num_vlm_layers": 16, "num_expert_layers": -1,
    "expert_width_multiplier": 0.75,
    "attention_mode": "cross_attn", "self_attn_every_n_layers": 2, "resize_imgs_with_padding": [512, 512],
    "input_features": {f"observation.images.camera{i}": {"type": "VISUAL", "shape": [3, 256, 256]}
                       for i in (1, 2, 3)} | {"observation.state": {"type": "STATE", "shape": [6]}},
}


def test_config_from_lerobot_and_smolvlm2_json() -> None:
    cfg = smolvla_config(SMOLVLA_BASE, SMOLVLM2_500M)
    assert cfg == SMOLVLA.variant("smolvla")
    assert cfg.image_tokens == 64 and cfg.expert.mlp == 2048 and cfg.prefix_len == 3 * 64 + 48 + 1
    assert smolvla_config(SMOLVLA_BASE | {"attention_mode": "self_attn"}, SMOLVLM2_500M).cross_layers == ()
    assert smolvla_config(SMOLVLA_BASE, SMOLVLM2_500M, {"num_views": 2, "llm": {"eps": 1e-6}}).llm.eps == 1e-6


@pytest.mark.parametrize("variant", sorted(SMOLVLA.variants))
def test_config_json_round_trip(variant: str) -> None:
    cfg = SMOLVLA.variants[variant]
    assert from_dict(SmolVLAConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_walk_contracts_and_fake_inputs(model: SmolVLAModel) -> None:
    seq = SMOLVLA.walks(model, CFG)
    assert seq.plan()[:2] == ["vision", "prefill"] and seq.plan()[2]["carry"] == {"x_next": "x_t"}
    assert seq.node("prefill").outputs[0].shape == (CFG.llm.layers + 1, 2, "num_pages", 16, 2, 16)
    dims: dict[str, int] = {}
    for name, value in SMOLVLA.fake_inputs(CFG, batch=3).items():
        name = "x_t" if name == "noise" else name
        spec = next(s for n in seq.nodes for s in n.inputs if s.name == name)
        spec.check(value, dims)
    assert dims == {"batch": 3, "views": CFG.num_views, "prompt_len": CFG.max_prompt_len}
    own = set(model.state_dict())
    for node in seq.nodes:
        assert set(node.module.state_dict()) < own
        with torch.no_grad():
            out = node.module(*(node.example_inputs[s.name] for s in node.inputs))
        out = out if isinstance(out, tuple) else (out,)
        bound: dict[str, int] = {}
        for spec in node.inputs:
            spec.check(node.example_inputs[spec.name].numpy(), bound)
        for tensor, spec in zip(out, node.outputs, strict=True):
            spec.check(tensor.numpy(), bound)
    assert np.isfinite(out[0].numpy()).all()
