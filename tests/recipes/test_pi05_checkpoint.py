"""LeRobot pi05 folders (strict key map, every shape checked) and `--config` overrides applied
before any size is inferred from shapes, for the pi0 and pi0.5 readers alike."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from walkforge import CompileRequest, compile_bundle
from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.recipes.blocks.gemma import GemmaConfig
from walkforge.recipes.weights import load_strict

PI0, PI05 = get_recipe("pi0"), get_recipe("pi05")
LM_HEADS = ("model.paligemma_with_expert.paligemma.lm_head.weight",
            "model.paligemma_with_expert.gemma_expert.lm_head.weight")
EXPERT_NORM = "model.paligemma_with_expert.gemma_expert.model.layers.1.post_attention_layernorm.dense.weight"
LEROBOT_CONFIG = {
    "type": "pi05", "chunk_size": 50, "n_action_steps": 50, "max_state_dim": 32, "max_action_dim": 32,
    "tokenizer_max_length": 24, "num_inference_steps": 10, "empty_cameras": 1,
    "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "IDENTITY", "ACTION": "IDENTITY"},
    "input_features": {
        "observation.images.base_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]},
        "observation.state": {"type": "STATE", "shape": [8]},
    },
}
# Head sizes no known variant has and no multiple of 256: only an override can name them.
ODD_LLM = GemmaConfig(width=64, layers=2, heads=4, kv_heads=1, head_dim=12, mlp=128, vocab=1000)
ODD_HEADS = {"llm": {"heads": 4}, "expert": {"head_dim": 12}}


def lerobot_folder(recipe, cfg, folder: Path, meta: dict | None = None) -> dict[str, torch.Tensor]:
    """A model of `cfg`, seeded, written in LeRobot's layout (+ the unused lm_heads)."""
    torch.manual_seed(0)
    model = recipe.build(cfg)
    tensors = {recipe.key_map.to_checkpoint(k): v.clone() for k, v in model.state_dict().items()}
    tensors |= {LM_HEADS[0]: torch.randn(cfg.llm.vocab, cfg.llm.width),
                LM_HEADS[1]: torch.randn(cfg.llm.vocab, cfg.expert.width)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    meta = meta or {**LEROBOT_CONFIG, "type": recipe.name, "tokenizer_max_length": cfg.max_prompt_len}
    (folder / "config.json").write_text(json.dumps(meta))
    return tensors


def test_pi05_folder_loads_strictly(tmp_path: Path) -> None:
    tensors = lerobot_folder(PI05, PI05.variant("tiny"), tmp_path)
    assert EXPERT_NORM in tensors and "model.time_mlp_in.weight" in tensors
    cfg, read = PI05.read_checkpoint(tmp_path, {})
    assert cfg == PI05.variant("tiny")  # two cameras (one empty), 24 prompt tokens, adaRMS of width 32
    counts = load_strict(PI05.build(cfg), read, PI05.key_map)
    assert counts == {"loaded": len(tensors) - 2, "ignored": 2}


def test_tied_embedding_is_taken_from_the_lm_head(tmp_path: Path) -> None:
    tensors = lerobot_folder(PI05, PI05.variant("tiny"), tmp_path)
    embed = tensors.pop("model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight")
    tensors[LM_HEADS[0]] = embed  # LeRobot saves the tied pair once, as the lm_head
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg, read = PI05.read_checkpoint(tmp_path, {})
    model = PI05.build(cfg)
    load_strict(model, read, PI05.key_map)
    assert torch.equal(model.llm.embed_tokens.weight, embed)


def test_misshaped_adarms_dense_names_key_and_shapes(tmp_path: Path) -> None:
    tensors = lerobot_folder(PI05, PI05.variant("tiny"), tmp_path)
    tensors[EXPERT_NORM] = torch.zeros(97, 32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg, read = PI05.read_checkpoint(tmp_path, {})
    with pytest.raises(WalkforgeError, match=r"dense\.weight' has shape \[97, 32\].*\[96, 32\]"):
        load_strict(PI05.build(cfg), read, PI05.key_map)


def test_a_pi0_folder_is_not_a_pi05_one(tmp_path: Path) -> None:
    lerobot_folder(PI0, PI0.variant("tiny"), tmp_path, {**LEROBOT_CONFIG, "type": "pi0"})
    with pytest.raises(WalkforgeError, match="not pi05 .*pi0 recipe"):
        PI05.read_checkpoint(tmp_path, {})
    with pytest.raises(WalkforgeError, match="config.json"):
        PI05.read_checkpoint(tmp_path / "nowhere", {})


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_overrides_name_heads_before_sizes_are_inferred(name: str, tmp_path: Path) -> None:
    recipe = get_recipe(name)
    tiny = recipe.variant("tiny")
    odd = replace(tiny, llm=ODD_LLM, expert=replace(tiny.expert, head_dim=12))
    lerobot_folder(recipe, odd, tmp_path)
    with pytest.raises(WalkforgeError, match="cannot infer the head size .*q 48, kv 12"):
        recipe.read_checkpoint(tmp_path, {})
    cfg, tensors = recipe.read_checkpoint(tmp_path, {**ODD_HEADS, "num_steps": 4})
    assert cfg == replace(odd, num_steps=4)
    load_strict(recipe.build(cfg), tensors, recipe.key_map)
    with pytest.raises(WalkforgeError, match="cannot infer the head size .*given"):
        recipe.read_checkpoint(tmp_path, {"llm": {"heads": 5}})


def test_compile_applies_the_config_file_to_the_checkpoint(tmp_path: Path) -> None:
    tiny = PI0.variant("tiny")
    odd = replace(tiny, llm=ODD_LLM, expert=replace(tiny.expert, head_dim=12))
    lerobot_folder(PI0, odd, tmp_path / "ckpt")
    (tmp_path / "heads.json").write_text(json.dumps(ODD_HEADS))
    manifest = compile_bundle(CompileRequest("pi0", tmp_path / "out", checkpoint=tmp_path / "ckpt",
                                             config_file=tmp_path / "heads.json", gpu_archs=()))
    assert manifest["config"]["llm"]["head_dim"] == 12 and manifest["weights"]["ignored"] == 2
