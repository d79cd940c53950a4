"""LeRobot pi0 checkpoints: the key map onto Pi0Model, and reading a folder (config.json +
model.safetensors).

LeRobot's config.json names the horizon, prompt length, steps and cameras but not the model
sizes; those are inferred from tensor shapes. Head counts appear in no shape, so they come from
a known variant whose other sizes match, else from the pi0 defaults (SigLIP 72 per head, Gemma
head_dim 256) when they divide.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.gemma import GemmaConfig
from walkforge.recipes.blocks.siglip import SiglipConfig
from walkforge.recipes.pi0.config import ACTION_HEADS, VARIANTS, Pi0Config
from walkforge.recipes.weights import KeyMap, read_safetensors

_PG = "model.paligemma_with_expert."
_VIS = _PG + "paligemma.model.vision_tower.vision_model."
_LLM = _PG + "paligemma.model.language_model."
_EXP = _PG + "gemma_expert.model."

KEY_MAP = KeyMap(
    prefixes=(
        (_VIS, "vision."),
        (_PG + "paligemma.model.multi_modal_projector.linear.", "projector."),
        (_LLM, "llm."),
        (_EXP, "expert."),
        *((f"model.{h}.", f"{h}.") for h in ACTION_HEADS),
    ),
    ignore=(r"(^|\.)lm_head\.weight$",),  # the VLM's and the expert's lm_heads never make actions
)


def _shape(tensors: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise WalkforgeError(f"checkpoint is missing '{key}': not a LeRobot pi0 checkpoint?")
    return tuple(tensors[key].shape)


def _depth(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})


def _infer_siglip(t: dict[str, torch.Tensor]) -> SiglipConfig:
    """Sizes from shapes; heads are not in any shape: a known variant's, else So400m's 72/head."""
    width, _, patch, _ = _shape(t, _VIS + "embeddings.patch_embedding.weight")
    side = math.isqrt(_shape(t, _VIS + "embeddings.position_embedding.weight")[0])
    cfg = SiglipConfig(width, _depth(t, _VIS + "encoder.layers."), 0,
                       _shape(t, _VIS + "encoder.layers.0.mlp.fc1.weight")[0], patch, side * patch)
    known = [v.vision.heads for v in VARIANTS.values() if replace(v.vision, heads=0) == cfg]
    return replace(cfg, heads=known[0] if known else max(1, width // 72))


def _infer_gemma(t: dict[str, torch.Tensor], prefix: str, vocab: int) -> GemmaConfig:
    """Sizes from shapes; head_dim is not in any shape: a known variant's, else Gemma's 256."""
    q_out, width = _shape(t, prefix + "layers.0.self_attn.q_proj.weight")
    kv_out = _shape(t, prefix + "layers.0.self_attn.k_proj.weight")[0]
    mlp = _shape(t, prefix + "layers.0.mlp.gate_proj.weight")[0]
    layers = _depth(t, prefix + "layers.")
    for g in [v.llm for v in VARIANTS.values()] + [v.expert for v in VARIANTS.values()]:
        if (g.width, g.layers, g.heads * g.head_dim, g.kv_heads * g.head_dim, g.mlp) == (
                width, layers, q_out, kv_out, mlp):
            return replace(g, vocab=vocab)
    if q_out % 256 or kv_out % 256:
        raise WalkforgeError(f"cannot infer the head size of '{prefix}' (q {q_out}, kv {kv_out})")
    return GemmaConfig(width, layers, q_out // 256, kv_out // 256, 256, mlp, vocab)


def read_checkpoint(folder: Path) -> tuple[Pi0Config, dict[str, torch.Tensor]]:
    """Read a LeRobot pi0 folder (config.json + model.safetensors) → (config, tensors).

    Sizes come from tensor shapes; horizon, prompt length, steps and cameras from config.json.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise WalkforgeError(f"{folder}: no config.json (expected a LeRobot pi0 folder)") from None
    tensors = read_safetensors(folder)
    features = meta.get("input_features") or {}
    views = sum(1 for f in features.values() if f.get("type") == "VISUAL") + meta.get("empty_cameras", 0)
    cfg = Pi0Config(
        vision=_infer_siglip(tensors),
        llm=_infer_gemma(tensors, _LLM, _shape(tensors, _LLM + "embed_tokens.weight")[0]),
        expert=_infer_gemma(tensors, _EXP, 0),
        num_views=views or 3,
        max_prompt_len=meta.get("tokenizer_max_length", 48),
        action_horizon=meta.get("chunk_size", 50),
        action_dim=_shape(tensors, "model.action_in_proj.weight")[1],
        state_dim=_shape(tensors, "model.state_proj.weight")[1],
        num_steps=meta.get("num_steps", 10),
    )
    return cfg, tensors
