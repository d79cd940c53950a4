"""pi0: the attention rule, end-to-end parity with a reference built from stock transformers
blocks, LeRobot checkpoint loading, configs and walk contracts. Random weights, CPU."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tolerances import PI0_TINY_ACTIONS_TOL, fp32_tol, rel_err
from torch import nn

from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.recipes.blocks.flow import make_attention_mask, suffix_attention_mask
from walkforge.recipes.blocks.gemma import GemmaConfig
from walkforge.recipes.configs import from_dict, to_dict
from walkforge.recipes.pi0.config import Pi0Config
from walkforge.recipes.pi0.model import Pi0Model
from walkforge.recipes.weights import load_strict

transformers = pytest.importorskip("transformers")

# rel_err of ours vs the stock-transformers reference, both torch fp32, per stage (measured: identical).
# The longest sums: vision, the 14·14·3-term patch embedding; prefix K/V, attention over 2·256 + 16
# prefix tokens; actions, see PI0_TINY_ACTIONS_TOL. A mask or RoPE slip moves these by 1e-2 and more.
TOL = {"vision": fp32_tol(14 * 14 * 3), "prefix_kv": fp32_tol(2 * 256 + 16), "actions": PI0_TINY_ACTIONS_TOL}
PI0 = get_recipe("pi0")
CFG = PI0.variant("tiny")
MASK_FILL = -2.3819763e38


@pytest.fixture(scope="module")
def model() -> Pi0Model:
    """Tiny pi0 with every parameter random, norms and biases included."""
    torch.manual_seed(0)
    m = PI0.build(CFG).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m


def torch_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in PI0.fake_inputs(CFG, batch=batch, seed=seed).items()}


# --- (d) the attention rule ----------------------------------------------------------------

def full_mask() -> tuple[torch.Tensor, int, int]:
    """Prefix of 5 (slot 3 padding) + suffix [state, 3 actions]; mask [1, 9, 9]."""
    pad = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ar = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    return make_attention_mask(pad, ar), 5, 5


def test_state_sees_prefix_and_itself_not_actions() -> None:
    mask, p, state = full_mask()
    assert mask[0, state, state] and not mask[0, state, state + 1:].any()
    assert mask[0, state, [0, 1, 2, 4]].all()


def test_actions_see_state_and_each_other() -> None:
    mask, p, state = full_mask()
    assert mask[0, state + 1:, state:].all()


def test_prefix_never_sees_suffix() -> None:
    mask, p, _ = full_mask()
    assert not mask[0, :p, p:].any()


def test_padding_never_attended() -> None:
    mask, _, _ = full_mask()
    assert not mask[0, :, 3].any() and not mask[0, 3, :].any()


def test_valid_tokens_see_all_valid_prefix() -> None:
    mask, p, _ = full_mask()
    rows = [0, 1, 2, 4, 5, 6, 7, 8]
    assert mask[0][rows][:, [0, 1, 2, 4]].all()


def test_suffix_mask_is_the_full_rule_split_at_the_cache() -> None:
    mask, p, _ = full_mask()
    pad = torch.ones(1, 4, dtype=torch.bool)
    ar = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    suffix = make_attention_mask(pad, ar)[0]
    split = suffix_attention_mask(torch.tensor([[1, 1, 1, 0, 1]], dtype=torch.bool), suffix)
    assert torch.equal(split[:, 0], mask[:, p:])


# --- (c) end to end against stock transformers blocks ---------------------------------------

def hf_gemma(g, vocab: int) -> transformers.GemmaModel:
    return transformers.GemmaModel(transformers.GemmaConfig(
        vocab_size=vocab, hidden_size=g.width, intermediate_size=g.mlp, num_hidden_layers=g.layers,
        num_attention_heads=g.heads, num_key_value_heads=g.kv_heads, head_dim=g.head_dim,
        rms_norm_eps=g.eps, hidden_activation="gelu_pytorch_tanh", attn_implementation="eager")).eval()


def reference_from(model: Pi0Model) -> dict[str, nn.Module]:
    """SiglipVisionModel, projector, VLM and expert GemmaModels sharing `model`'s weights."""
    v = CFG.vision
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp, num_hidden_layers=v.layers,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch, layer_norm_eps=v.eps,
        vision_use_head=False, attn_implementation="eager")).eval()
    vision.load_state_dict(model.vision.state_dict(), strict=True)
    vlm = hf_gemma(CFG.llm, CFG.llm.vocab)
    vlm.load_state_dict(model.llm.state_dict(), strict=True)
    expert = hf_gemma(CFG.expert, 8)  # its embedding is unused (pi0 has none)
    result = expert.load_state_dict(model.expert.state_dict(), strict=False)
    assert result.missing_keys == ["embed_tokens.weight"] and not result.unexpected_keys
    return {"vision": vision, "projector": model.projector, "vlm": vlm, "expert": expert}


def rule_mask(pad: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """docs/model_facts.md: i sees j iff cumsum(ar)[j] <= cumsum(ar)[i] and both real. [B, N, N]."""
    c = ar.long().cumsum(-1).expand(pad.shape)
    return (c[:, None, :] <= c[:, :, None]) & pad[:, None, :] & pad[:, :, None]


def additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, 0.0, MASK_FILL)[:, None]


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    x = t.double()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([torch.sin(x), torch.cos(x)], -1).float()


def reference_actions(model: Pi0Model, ref: dict[str, nn.Module], x: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, object]:
    b, v = x["image_masks"].shape
    pixels = x["images"].flatten(0, 1) * 2 - 1
    image_tokens = ref["projector"](ref["vision"](pixel_values=pixels).last_hidden_state)
    image_tokens = image_tokens.reshape(b, -1, CFG.llm.width)
    prefix = torch.cat([image_tokens, ref["vlm"].embed_tokens(x["prompt_ids"])], 1)
    pad = torch.cat([x["image_masks"].repeat_interleave(256, 1), x["prompt_mask"]], 1)
    ar = torch.zeros(pad.shape[1], dtype=torch.bool)
    cache = ref["vlm"](inputs_embeds=prefix, attention_mask=additive(rule_mask(pad, ar)),
                       position_ids=pad.long().cumsum(-1) - 1, use_cache=True).past_key_values
    s = 1 + CFG.action_horizon
    full_pad = torch.cat([pad, torch.ones(b, s, dtype=torch.bool)], 1)
    full_ar = torch.cat([ar, torch.arange(s) < 2])
    mask = additive(rule_mask(full_pad, full_ar)[:, -s:])  # [B, 1, S, P+S]
    positions = pad.sum(-1, keepdim=True) + torch.arange(s)
    steps, dt, act = CFG.num_steps, -1.0 / CFG.num_steps, x["noise"]
    for k in range(steps):
        t = torch.full((b,), 1 + k * dt)
        a = model.action_in_proj(act)
        a = torch.cat([a, sinusoid(t, a.shape[-1])[:, None].expand_as(a)], -1)
        a = model.action_time_mlp_out(torch.nn.functional.silu(model.action_time_mlp_in(a)))
        suffix = torch.cat([model.state_proj(x["state"])[:, None], a], 1)
        out = ref["expert"](inputs_embeds=suffix, attention_mask=mask, position_ids=positions,
                            past_key_values=copy.deepcopy(cache), use_cache=True).last_hidden_state
        act = act + dt * model.action_out_proj(out[:, -CFG.action_horizon:])
    return image_tokens, act, cache


def test_sample_actions_match_transformers_reference(model: Pi0Model) -> None:
    x = torch_inputs(batch=2)
    assert not x["image_masks"].all() and x["prompt_mask"].sum(1).unique().numel() == 2
    with torch.no_grad():
        image_tokens, want, cache = reference_actions(model, reference_from(model), x)
        got_tokens = model.embed_images(x["images"])
        prefix_k, prefix_v, _ = model.prefill(got_tokens, x["image_masks"], x["prompt_ids"], x["prompt_mask"])
        got = model.sample_actions(x["images"], x["image_masks"], x["prompt_ids"], x["prompt_mask"],
                                   x["state"], x["noise"])
    assert rel_err(got_tokens, image_tokens) <= TOL["vision"]
    for i, layer in enumerate(cache.layers):
        assert rel_err(prefix_k[i], layer.keys) <= TOL["prefix_kv"]
        assert rel_err(prefix_v[i], layer.values) <= TOL["prefix_kv"]
    assert got.shape == (2, CFG.action_horizon, CFG.action_dim)
    assert rel_err(got, want) <= TOL["actions"]
    assert rel_err(got, x["noise"]) > 1e-2  # the steps moved the noise (by O(1), 1000× any TOL)


# --- weights -----------------------------------------------------------------------------

LEROBOT_CONFIG = {
    "type": "pi0", "chunk_size": 50, "n_action_steps": 50, "max_state_dim": 32, "max_action_dim": 32,
    "tokenizer_max_length": 16, "num_steps": 10, "empty_cameras": 0,
    "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "IDENTITY", "ACTION": "IDENTITY"},
    "input_features": {
        "observation.images.top": {"type": "VISUAL", "shape": [3, 480, 640]},
        "observation.images.wrist": {"type": "VISUAL", "shape": [3, 480, 640]},
        "observation.state": {"type": "STATE", "shape": [14]},
    },
}
LM_HEADS = ("model.paligemma_with_expert.paligemma.lm_head.weight",
            "model.paligemma_with_expert.gemma_expert.lm_head.weight")


def lerobot_folder(model: Pi0Model, folder: Path, bf16: bool = False) -> dict[str, torch.Tensor]:
    """Write `model` in LeRobot's layout (+ unused lm_heads); bf16 keeps LeRobot's fp32 tensors."""
    tensors = {PI0.key_map.to_checkpoint(k): v.clone() for k, v in model.state_dict().items()}
    tensors[LM_HEADS[0]] = torch.randn(CFG.llm.vocab, CFG.llm.width)
    tensors[LM_HEADS[1]] = torch.randn(CFG.llm.vocab, CFG.expert.width)
    if bf16:
        keep = ("patch_embedding", "position_embedding", "layernorm", ".norm.")
        tensors = {k: v if any(s in k for s in keep) else v.bfloat16() for k, v in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(LEROBOT_CONFIG))
    return tensors


def test_checkpoint_loads_strictly(model: Pi0Model, tmp_path: Path) -> None:
    lerobot_folder(model, tmp_path)
    cfg, tensors = PI0.read_checkpoint(tmp_path)
    assert cfg == CFG
    loaded = PI0.build(cfg)
    counts = load_strict(loaded, tensors, PI0.key_map)
    assert counts == {"loaded": len(model.state_dict()), "ignored": 2}
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_bf16_checkpoint_loads(model: Pi0Model, tmp_path: Path) -> None:
    written = lerobot_folder(model, tmp_path, bf16=True)
    assert any(t.dtype == torch.bfloat16 for t in written.values())
    cfg, tensors = PI0.read_checkpoint(tmp_path)
    loaded = PI0.build(cfg)
    load_strict(loaded, tensors, PI0.key_map)
    for name, p in loaded.state_dict().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, written[PI0.key_map.to_checkpoint(name)].float()), name


def test_misshaped_tensor_names_key_and_shapes(model: Pi0Model, tmp_path: Path) -> None:
    key = "model.paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    tensors = lerobot_folder(model, tmp_path)
    tensors[key] = torch.zeros(CFG.expert.mlp + 1, CFG.expert.width)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg, read = PI0.read_checkpoint(tmp_path)
    with pytest.raises(WalkforgeError, match=r"up_proj\.weight' has shape \[65, 32\].*\[64, 32\]"):
        load_strict(PI0.build(cfg), read, PI0.key_map)


def test_folder_without_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(WalkforgeError, match="config.json"):
        PI0.read_checkpoint(tmp_path)


# --- configs, inputs, walks --------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(PI0.variants))
def test_config_json_round_trip(variant: str) -> None:
    cfg = PI0.variants[variant]
    data = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(Pi0Config, data) == cfg


def test_mismatched_expert_is_refused() -> None:
    with pytest.raises(WalkforgeError, match="head_dim"):
        Pi0Config(CFG.vision, CFG.llm, GemmaConfig(32, 2, 2, 1, 8, 64))


def test_walk_contracts_and_fake_inputs(model: Pi0Model) -> None:
    seq = PI0.walks(model, CFG)
    assert seq.plan()[:2] == ["vision", "prefill"] and seq.plan()[2]["carry"] == {"x_next": "x_t"}
    assert seq.node("prefill").outputs[0].shape == (2, 2, "num_pages", 16, 1, 16)
    assert dict(seq.node("prefill").aliases) == {"kv_pool_out": "kv_pool"}
    dims: dict[str, int] = {}
    for name, value in PI0.fake_inputs(CFG, batch=3).items():
        name = "x_t" if name == "noise" else name  # the noise is the first x_t
        spec = next(s for n in seq.nodes for s in n.inputs if s.name == name)
        spec.check(value, dims)
    # cameras and prompt tokens are dynamic (the front compacts them); fake inputs fill every slot
    assert dims == {"batch": 3, "views": CFG.num_views, "prompt_len": CFG.max_prompt_len}
    own = set(model.state_dict())
    for node in seq.nodes:
        assert set(node.module.state_dict()) < own  # model names, only this walk's parts
        with torch.no_grad():
            out = node.module(*(node.example_inputs[s.name] for s in node.inputs))
        out = out if isinstance(out, tuple) else (out,)
        bound: dict[str, int] = {}
        for spec in node.inputs:  # binds batch, num_pages, max_pages from the examples
            spec.check(node.example_inputs[spec.name].numpy(), bound)
        for tensor, spec in zip(out, node.outputs, strict=True):
            spec.check(tensor.numpy(), bound)  # shape, symbolic dims and dtype
    assert np.isfinite(out[0].numpy()).all()
