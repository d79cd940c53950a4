"""LeRobot pi0 checkpoints: the key map onto Pi0Model, and reading a folder (config.json +
model.safetensors). pi0.5's reader (recipes/pi05/checkpoint.py) uses the same size inference.

LeRobot's config.json names the horizon, prompt length, steps and cameras but not the model
sizes; those are inferred from tensor shapes. Head counts and head sizes appear in no shape,
so `--config` overrides are applied first: a `heads` or `head_dim` they give fixes the split of
the projection widths. Otherwise they come from a known variant whose other sizes match, else
from the pi0 defaults (SigLIP 72 per head, Gemma head_dim 256) when they divide.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.gemma import GemmaConfig
from walkforge.recipes.blocks.siglip import SiglipConfig
from walkforge.recipes.configs import from_dict, to_dict
from walkforge.recipes.pi0.config import ACTION_HEADS, VARIANTS, Pi0Config
from walkforge.recipes.weights import KeyMap, read_safetensors

PG = "model.paligemma_with_expert."
VIS = PG + "paligemma.model.vision_tower.vision_model."
LLM = PG + "paligemma.model.language_model."
EXP = PG + "gemma_expert.model."
# The VLM, projector and expert prefixes, shared by the pi0 and pi0.5 key maps.
PALIGEMMA_PREFIXES = ((VIS, "vision."), (PG + "paligemma.model.multi_modal_projector.linear.", "projector."),
                      (LLM, "llm."), (EXP, "expert."))
LM_HEADS = (r"(^|\.)lm_head\.weight$",)  # the VLM's and the expert's lm_heads never make actions

KEY_MAP = KeyMap(
    prefixes=(*PALIGEMMA_PREFIXES, *((f"model.{h}.", f"{h}.") for h in ACTION_HEADS)),
    ignore=LM_HEADS,
)


def shape(tensors: Mapping[str, torch.Tensor], key: str, kind: str = "pi0") -> tuple[int, ...]:
    if key not in tensors:
        raise WalkforgeError(f"checkpoint is missing '{key}': not a LeRobot {kind} checkpoint?")
    return tuple(tensors[key].shape)


def _depth(tensors: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})


def _infer_siglip(t: Mapping[str, torch.Tensor], given: Mapping[str, Any], known: list[SiglipConfig]
                  ) -> SiglipConfig:
    """Sizes from shapes; heads from `given`, else a known variant's, else So400m's 72 per head."""
    width, _, patch, _ = shape(t, VIS + "embeddings.patch_embedding.weight")
    side = math.isqrt(shape(t, VIS + "embeddings.position_embedding.weight")[0])
    cfg = SiglipConfig(width, _depth(t, VIS + "encoder.layers."), 0,
                       shape(t, VIS + "encoder.layers.0.mlp.fc1.weight")[0], patch, side * patch)
    same = [v.heads for v in known if replace(v, heads=0) == cfg]
    heads = given.get("heads") or (same[0] if same else max(1, width // 72))
    return from_dict(SiglipConfig, dict(given), replace(cfg, heads=heads))


def _head_dim(q_out: int, given: Mapping[str, Any], same: list[GemmaConfig]) -> int:
    """Gemma's head size: `given` head_dim, else q_out / given heads, else a matching variant's, else 256."""
    if given.get("head_dim"):
        return int(given["head_dim"])
    if given.get("heads"):
        return q_out // int(given["heads"]) if q_out % int(given["heads"]) == 0 else 0
    return same[0].head_dim if same else 256


def _infer_gemma(t: Mapping[str, torch.Tensor], prefix: str, vocab: int, given: Mapping[str, Any],
                 known: list[GemmaConfig]) -> GemmaConfig:
    """Sizes from shapes, adaRMS when the norms have a `dense`; the head split as `_head_dim` says."""
    q_out, width = shape(t, prefix + "layers.0.self_attn.q_proj.weight")
    kv_out = shape(t, prefix + "layers.0.self_attn.k_proj.weight")[0]
    mlp = shape(t, prefix + "layers.0.mlp.gate_proj.weight")[0]
    dense = t.get(prefix + "layers.0.input_layernorm.dense.weight")
    same = [g for g in known if (g.width, g.heads * g.head_dim, g.kv_heads * g.head_dim, g.mlp)
            == (width, q_out, kv_out, mlp)]
    dh = _head_dim(q_out, given, same)
    if not dh or q_out % dh or kv_out % dh:
        raise WalkforgeError(f"cannot infer the head size of '{prefix}' (q {q_out}, kv {kv_out}"
                             f"{', given ' + json.dumps(dict(given)) if given else ''}): give heads and "
                             "head_dim that divide them in --config")
    cfg = GemmaConfig(width, _depth(t, prefix + "layers."), q_out // dh, kv_out // dh, dh, mlp, vocab,
                      cond_dim=0 if dense is None else dense.shape[1])
    return from_dict(GemmaConfig, dict(given), cfg)


def read_folder(folder: Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, tensors) of a LeRobot policy folder; `kind` (pi0, pi05) names it in errors.

    LeRobot may save the VLM's `embed_tokens` only as the `lm_head` it is tied to: take it from there.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise WalkforgeError(f"{folder}: no config.json (expected a LeRobot {kind} folder)") from None
    except json.JSONDecodeError as exc:
        raise WalkforgeError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
    tensors = read_safetensors(folder)
    if LLM + "embed_tokens.weight" not in tensors and PG + "paligemma.lm_head.weight" in tensors:
        tensors[LLM + "embed_tokens.weight"] = tensors[PG + "paligemma.lm_head.weight"]
    return meta, tensors


def lerobot_config(cls: type, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                   overrides: Mapping[str, Any], known: Iterable[Any], prompt_len: int,
                   **fields: Any) -> Any:
    """A pi0-family config: blocks inferred from shapes with `overrides` applied before anything
    is inferred, config.json's horizon, prompt length, steps and cameras, then `fields`; the
    overrides win over everything."""
    known = list(known)
    given = {k: overrides.get(k) or {} for k in ("vision", "llm", "expert")}
    features = meta.get("input_features") or {}
    views = sum(1 for f in features.values() if f.get("type") == "VISUAL") + meta.get("empty_cameras", 0)
    blocks = {
        "vision": _infer_siglip(tensors, given["vision"], [v.vision for v in known]),
        "llm": _infer_gemma(tensors, LLM, shape(tensors, LLM + "embed_tokens.weight")[0], given["llm"],
                            [v.llm for v in known]),
        "expert": _infer_gemma(tensors, EXP, 0, given["expert"], [v.expert for v in known]),
    }
    data = {"num_views": views or 3, "max_prompt_len": meta.get("tokenizer_max_length", prompt_len),
            "action_horizon": meta.get("chunk_size", 50),
            "num_steps": meta.get("num_inference_steps", meta.get("num_steps", 10)), **fields,
            **{k: v for k, v in overrides.items() if k not in blocks},
            **{k: to_dict(b) for k, b in blocks.items()}}
    return from_dict(cls, data)


def read_checkpoint(folder: Path, overrides: Mapping[str, Any] | None = None
                    ) -> tuple[Pi0Config, dict[str, torch.Tensor]]:
    """Read a LeRobot pi0 folder (config.json + model.safetensors) → (config, tensors).

    Sizes come from tensor shapes; horizon, prompt length, steps and cameras from config.json;
    `overrides` (the `--config` JSON) are applied before any size is inferred, and win.
    """
    meta, tensors = read_folder(folder, "pi0")
    cfg = lerobot_config(Pi0Config, meta, tensors, overrides or {}, VARIANTS.values(), 48,
                         action_dim=shape(tensors, "model.action_in_proj.weight")[1],
                         state_dim=shape(tensors, "model.state_proj.weight")[1])
    return cfg, tensors
