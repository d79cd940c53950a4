"""pi0.5: the suffix's attention rule, the adaRMS Gemma block and the whole sampler against
references built from stock transformers blocks plus hand-written adaRMS glue
(docs/model_facts.md, "pi0.5 differences"), configs and walk contracts. Random weights, CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_pi0 import additive, hf_gemma, rule_mask, sinusoid
from tolerances import PI0_TINY_ACTIONS_TOL, fp32_tol, rel_err
from torch import nn
from torch.nn import functional as F

from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.recipes.blocks.flow import make_attention_mask, suffix_attention_mask
from walkforge.recipes.blocks.gemma import Gemma, GemmaConfig, run_stack
from walkforge.recipes.configs import from_dict, to_dict
from walkforge.recipes.pi05.config import Pi05Config
from walkforge.recipes.pi05.model import Pi05Model, suffix_ar

transformers = pytest.importorskip("transformers")

PI05 = get_recipe("pi05")
CFG = PI05.variant("tiny")
# rel_err of ours vs the stock-transformers reference, both torch fp32, per stage. The longest sums:
# the adaRMS block test's 64-term projections (width, heads·head_dim and MLP all 64): 7.6e-6; vision,
# the 14·14·3-term patch embedding; prefix K/V, attention over 2·256 + 24 prefix tokens; actions as
# pi0's (its 51 suffix tokens bound pi0.5's 50). A missing gate, a swapped scale/shift, a weight used
# where adaRMS has none or a mask slip moves these by 1e-2 and more.
TOL = {"adarms_block": fp32_tol(64), "vision": fp32_tol(14 * 14 * 3),
       "prefix_kv": fp32_tol(2 * 256 + 24), "actions": PI0_TINY_ACTIONS_TOL}


def randomise(module: nn.Module, seed: int = 1) -> nn.Module:
    """Every norm weight and bias random, adaRMS denses included (they start at defaults)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


@pytest.fixture(scope="module")
def model() -> Pi05Model:
    torch.manual_seed(0)
    return randomise(PI05.build(CFG).eval())


# --- (d) the pi0.5 suffix's attention rule ------------------------------------------------

def full_mask() -> tuple[torch.Tensor, int]:
    """Prefix of 5 (slot 3 padding) + suffix of 4 action tokens, flags [1, 0, 0, 0]; [1, 9, 9]."""
    pad = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ar = torch.cat([torch.zeros(5, dtype=torch.bool), suffix_ar(4)])
    return make_attention_mask(pad, ar), 5


def test_suffix_flags_start_one_block() -> None:
    assert suffix_ar(4).tolist() == [True, False, False, False]


def test_actions_see_valid_prefix_and_every_action() -> None:
    mask, p = full_mask()
    assert mask[0, p:, p:].all()
    assert mask[0, p:][:, [0, 1, 2, 4]].all() and not mask[0, p:, 3].any()


def test_prefix_never_sees_the_actions_and_padding_is_never_attended() -> None:
    mask, p = full_mask()
    assert not mask[0, :p, p:].any()
    assert not mask[0, :, 3].any() and not mask[0, 3, :].any()


def test_suffix_mask_is_the_full_rule_split_at_the_cache() -> None:
    mask, p = full_mask()
    suffix = make_attention_mask(torch.ones(1, 4, dtype=torch.bool), suffix_ar(4))[0]
    split = suffix_attention_mask(torch.tensor([[1, 1, 1, 0, 1]], dtype=torch.bool), suffix)
    assert torch.equal(split[:, 0], mask[:, p:])


# --- adaRMS glue, written from docs/model_facts.md -----------------------------------------

def adarms(x: torch.Tensor, dense: nn.Linear, cond: torch.Tensor, eps: float = 1e-6
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift, gate) = split(dense(cond), 3); y = rmsnorm(x)·(1 + scale) + shift. → (y, gate)."""
    scale, shift, gate = torch.tensor_split(dense(cond)[:, None], 3, dim=-1)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * (1 + scale) + shift, gate


def hf_adarms_stack(hf: transformers.GemmaModel, ours: Gemma, x: torch.Tensor, positions: torch.Tensor,
                    mask: torch.Tensor, cond: torch.Tensor, cache: object = None) -> torch.Tensor:
    """Stock transformers attention and MLP per layer; residuals x + sublayer(y)·gate; final norm
    (its gate unused). `ours` lends only the adaRMS `dense` weights. mask: additive [B, 1, S, K]."""
    rotary = hf.rotary_emb(x, position_ids=positions)
    for hf_layer, layer in zip(hf.layers, ours.layers, strict=True):
        y, gate = adarms(x, layer.input_layernorm.dense, cond)
        x = x + hf_layer.self_attn(y, position_embeddings=rotary, attention_mask=mask, cache=cache)[0] * gate
        y, gate = adarms(x, layer.post_attention_layernorm.dense, cond)
        x = x + hf_layer.mlp(y) * gate
    return adarms(x, ours.norm.dense, cond)[0]


def hf_twin(ours: Gemma) -> transformers.GemmaModel:
    """A stock GemmaModel holding `ours`' attention and MLP weights (its own norms go unused)."""
    hf = hf_gemma(ours.cfg, 8)
    result = hf.load_state_dict(ours.state_dict(), strict=False)
    assert all(".dense." in k for k in result.unexpected_keys)
    assert all(k == "embed_tokens.weight" or "norm" in k for k in result.missing_keys)
    return hf


def test_adarms_block_matches_transformers_layers_with_glue() -> None:
    cfg = GemmaConfig(width=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=64, cond_dim=32)
    torch.manual_seed(0)
    ours = randomise(Gemma(cfg).eval())
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, 1] = False
    mask = rule_mask(pad, torch.tensor([0, 0, 0, 1, 0, 1, 0], dtype=torch.bool))[:, None]
    positions = pad.long().cumsum(-1) - 1
    x, cond = torch.randn(2, 7, 64), torch.randn(2, 32)
    with torch.no_grad():
        want = hf_adarms_stack(hf_twin(ours), ours, x, positions, additive(mask[:, 0]), cond)
        got = run_stack(ours, x, positions, mask, cond)
        plain = Gemma(GemmaConfig(64, 2, 4, 2, 16, 64)).eval()
    norms = [k for k in plain.state_dict() if "norm" in k]
    assert set(ours.state_dict()) - set(plain.state_dict()) == {
        k.replace("weight", f"dense.{w}") for k in norms for w in ("weight", "bias")}
    assert rel_err(got, want) <= TOL["adarms_block"]


# --- (c) end to end against stock transformers blocks ---------------------------------------

def reference_from(model: Pi05Model) -> dict[str, nn.Module]:
    """SiglipVisionModel, projector, VLM GemmaModel and the expert's stock twin, sharing `model`'s weights."""
    v = CFG.vision
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp, num_hidden_layers=v.layers,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch, layer_norm_eps=v.eps,
        vision_use_head=False, attn_implementation="eager")).eval()
    vision.load_state_dict(model.vision.state_dict(), strict=True)
    vlm = hf_gemma(CFG.llm, CFG.llm.vocab)
    vlm.load_state_dict(model.llm.state_dict(), strict=True)
    return {"vision": vision, "projector": model.projector, "vlm": vlm, "expert": hf_twin(model.expert)}


def reference_actions(model: Pi05Model, ref: dict[str, nn.Module], x: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Prefix pass with cache (stock VLM), then per Euler step the expert over 50 action tokens."""
    b = x["image_masks"].shape[0]
    pixels = x["images"].flatten(0, 1) * 2 - 1
    image_tokens = ref["projector"](ref["vision"](pixel_values=pixels).last_hidden_state).reshape(b, -1, 64)
    prefix = torch.cat([image_tokens, ref["vlm"].embed_tokens(x["prompt_ids"])], 1)
    pad = torch.cat([x["image_masks"].repeat_interleave(256, 1), x["prompt_mask"]], 1)
    ar = torch.zeros(pad.shape[1], dtype=torch.bool)
    cache = ref["vlm"](inputs_embeds=prefix, attention_mask=additive(rule_mask(pad, ar)),
                       position_ids=pad.long().cumsum(-1) - 1, use_cache=True).past_key_values
    s = CFG.action_horizon
    full_pad = torch.cat([pad, torch.ones(b, s, dtype=torch.bool)], 1)
    mask = additive(rule_mask(full_pad, torch.cat([ar, torch.arange(s) < 1]))[:, -s:])  # [B, 1, S, P+S]
    positions = pad.sum(-1, keepdim=True) + torch.arange(s)
    dt, act = -1.0 / CFG.num_steps, x["noise"]
    for k in range(CFG.num_steps):
        emb = sinusoid(torch.full((b,), 1 + k * dt), CFG.expert.width)
        cond = F.silu(model.time_mlp_out(F.silu(model.time_mlp_in(emb))))
        out = hf_adarms_stack(ref["expert"], model.expert, model.action_in_proj(act), positions, mask, cond,
                              copy.deepcopy(cache))
        act = act + dt * model.action_out_proj(out)
    return image_tokens, act, cache


def test_sample_actions_match_transformers_reference(model: Pi05Model) -> None:
    x = {k: torch.from_numpy(v) for k, v in PI05.fake_inputs(CFG, batch=2).items()}
    assert not x["image_masks"].all() and x["prompt_mask"].sum(1).unique().numel() == 2
    with torch.no_grad():
        image_tokens, want, cache = reference_actions(model, reference_from(model), x)
        got_tokens = model.embed_images(x["images"])
        prefix_k, prefix_v, _ = model.prefill(got_tokens, x["image_masks"], x["prompt_ids"], x["prompt_mask"])
        got = model.sample_actions(x["images"], x["image_masks"], x["prompt_ids"], x["prompt_mask"],
                                   x["noise"])
    assert rel_err(got_tokens, image_tokens) <= TOL["vision"]
    for i, layer in enumerate(cache.layers):
        assert rel_err(prefix_k[i], layer.keys) <= TOL["prefix_kv"]
        assert rel_err(prefix_v[i], layer.values) <= TOL["prefix_kv"]
    assert got.shape == (2, CFG.action_horizon, CFG.action_dim)
    assert rel_err(got, want) <= TOL["actions"]
    assert rel_err(got, x["noise"]) > 1e-2  # the steps moved the noise (by O(1), 1000× any TOL)


# --- configs, walks -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(PI05.variants))
def test_config_json_round_trip(variant: str) -> None:
    cfg = PI05.variants[variant]
    assert from_dict(Pi05Config, to_dict(cfg)) == cfg


def test_impossible_configs_are_refused() -> None:
    with pytest.raises(WalkforgeError, match="head_dim"):
        Pi05Config(CFG.vision, CFG.llm, GemmaConfig(32, 2, 2, 1, 8, 64, cond_dim=32))
    with pytest.raises(WalkforgeError, match="cond_dim"):
        Pi05Config(CFG.vision, CFG.llm, GemmaConfig(32, 2, 2, 1, 16, 64))


def test_full_size_is_pi05s() -> None:
    with torch.device("meta"):
        full = PI05.build(PI05.variant("pi05"))
    assert len(full.state_dict()) + 2 == 813  # + the two unused lm_heads of LeRobot's file
    assert not hasattr(full, "state_proj") and full.expert.norm.dense.weight.shape == (3072, 1024)


def test_walk_contracts_and_fake_inputs(model: Pi05Model) -> None:
    seq = PI05.walks(model, CFG)
    assert seq.plan()[:2] == ["vision", "prefill"] and seq.plan()[2]["carry"] == {"x_next": "x_t"}
    assert dict(seq.node("prefill").aliases) == {"kv_pool_out": "kv_pool"}
    assert "state" not in {s.name for n in seq.nodes for s in n.inputs}
    own = set(model.state_dict())
    for node in seq.nodes:
        assert set(node.module.state_dict()) < own  # model names, only this walk's parts
        with torch.no_grad():
            out = node.module(*(node.example_inputs[s.name] for s in node.inputs))
        out = out if isinstance(out, tuple) else (out,)
        bound: dict[str, int] = {}
        for spec in node.inputs:
            spec.check(node.example_inputs[spec.name].numpy(), bound)
        for tensor, spec in zip(out, node.outputs, strict=True):
            spec.check(tensor.numpy(), bound)
    assert np.isfinite(out[0].numpy()).all()
