"""Shared blocks against stock transformers modules, on random weights, on CPU."""

from __future__ import annotations

import pytest
import torch
from tolerances import fp32_tol, rel_err
from torch import nn

from walkforge.recipes.blocks.gemma import MASK_FILL, Gemma, GemmaConfig, run_stack
from walkforge.recipes.blocks.siglip import SiglipConfig, SiglipVision

transformers = pytest.importorskip("transformers")

# ours vs transformers, both torch fp32, relative to the output scale (measured: identical). The
# longest sums: SigLIP's 14·14·3-term patch embedding (2.3e-5), Gemma's 128-term MLP down-projection
# (1.1e-5). A wrong (1 + w) norm, a missed bias, a mask or RoPE slip moves outputs by 1e-2 and more.
TOL = {"siglip": fp32_tol(14 * 14 * 3), "gemma": fp32_tol(128)}


def randomise_norms(module: nn.Module, seed: int = 0) -> None:
    """Norm weights (and LayerNorm biases) start at constants; make them random so a wrong
    (1 + w) or a missing bias shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_siglip_matches_transformers() -> None:
    cfg = SiglipConfig(width=32, layers=2, heads=2, mlp=64, patch=14, image_size=56)
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
        patch_size=14, layer_norm_eps=1e-6, vision_use_head=False, attn_implementation="eager")
    torch.manual_seed(0)
    ref = transformers.SiglipVisionModel(hf_cfg).eval()
    randomise_norms(ref)
    ours = SiglipVision(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    images = torch.rand(3, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        want = ref(pixel_values=images).last_hidden_state
        got = ours(images)
    assert got.shape == (3, cfg.tokens, 32)
    assert rel_err(got, want) <= TOL["siglip"]


def _gemma_pair() -> tuple[Gemma, transformers.GemmaModel]:
    cfg = GemmaConfig(width=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=100)
    hf_cfg = transformers.GemmaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        attn_implementation="eager")
    torch.manual_seed(0)
    ref = transformers.GemmaModel(hf_cfg).eval()
    randomise_norms(ref)
    ours = Gemma(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _prefix_lm_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask [2, 1, 7, 7]: 4 bidirectional tokens then 3 causal ones; request 1 has its
    2nd token padded. Positions skip the padding."""
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 1] = False
    block = torch.tensor([0, 0, 0, 0, 1, 2, 3]).cumsum(0)
    mask = (block[None, :] <= block[:, None]) & valid[:, None, :] & valid[:, :, None]
    return mask[:, None], valid.long().cumsum(-1) - 1


def test_gemma_matches_transformers_from_ids() -> None:
    ours, ref = _gemma_pair()
    mask, positions = _prefix_lm_mask()
    ids = torch.randint(0, 100, (2, 7))
    additive = torch.where(mask, 0.0, MASK_FILL)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=additive, position_ids=positions).last_hidden_state
        got = run_stack(ours, ours.embed(ids), positions, mask)
    assert rel_err(got, want) <= TOL["gemma"]


def test_gemma_matches_transformers_from_embeds() -> None:
    """transformers 5 scales token embeddings inside `embed_tokens`, not `inputs_embeds`:
    given the same embeddings both stacks must agree without any extra factor."""
    ours, ref = _gemma_pair()
    mask, positions = _prefix_lm_mask()
    embeds = torch.randn(2, 7, 64)
    with torch.no_grad():
        want = ref(inputs_embeds=embeds, attention_mask=torch.where(mask, 0.0, MASK_FILL),
                   position_ids=positions).last_hidden_state
        got = run_stack(ours, embeds, positions, mask)
        ids = torch.randint(0, 100, (2, 7))
        assert torch.equal(ours.embed(ids), ref.embed_tokens(ids))  # a lookup times 8.0: exact anywhere
    assert rel_err(got, want) <= TOL["gemma"]
