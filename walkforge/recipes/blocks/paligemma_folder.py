"""LeRobot folders of the PaliGemma family (pi0, pi0.5): their key layout, the sizes read from
tensor shapes, and the folder reader both recipes use.

LeRobot's config.json names the horizon, prompt length, steps and cameras, and the Gemma sizes
only as `paligemma_variant` / `action_expert_variant` (gemma_2b, gemma_300m). Those apply where
the tensors have the variant's width; otherwise sizes come from tensor shapes. Head counts and
head sizes appear in no shape, so `--config` overrides are applied first: a `heads` or `head_dim`
they give fixes the split of the projection widths. Otherwise the split comes from the named
variant, else a known walkforge variant whose other sizes match, else from the pi0 defaults
(SigLIP 72 per head, Gemma head_dim 256) when they divide. A variant or override that disagrees
with the tensors is a one-line error naming the field and both values.
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
from walkforge.recipes.configs import from_dict, read_json_object, to_dict
from walkforge.recipes.lerobot import depth, lerobot_cameras, lerobot_weights, shape

# LeRobot's `paligemma_variant` / `action_expert_variant` names (its modeling_pi0 get_gemma_config);
# pi0 and pi05 alike. The VLM's vocab is PaliGemma's; the expert's is unused.
LEROBOT_GEMMA: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(width=2048, layers=18, heads=8, kv_heads=1, head_dim=256, mlp=16384,
                            vocab=257152),
    "gemma_300m": GemmaConfig(width=1024, layers=18, heads=8, kv_heads=1, head_dim=256, mlp=4096),
}

PG = "model.paligemma_with_expert."
VIS = PG + "paligemma.model.vision_tower.vision_model."
LLM = PG + "paligemma.model.language_model."
EXP = PG + "gemma_expert.model."
# The VLM, projector and expert prefixes, shared by the pi0 and pi0.5 key maps.
PALIGEMMA_PREFIXES = ((VIS, "vision."), (PG + "paligemma.model.multi_modal_projector.linear.", "projector."),
                      (LLM, "llm."), (EXP, "expert."))
LM_HEADS = (r"(^|\.)lm_head\.weight$",)  # the VLM's and the expert's lm_heads never make actions

BLOCK_PREFIX = {"llm": LLM, "expert": EXP}
VARIANT_FIELDS = {"llm": "paligemma_variant", "expert": "action_expert_variant"}  # config.json's names



def _infer_siglip(t: Mapping[str, torch.Tensor], given: Mapping[str, Any], known: list[SiglipConfig]
                  ) -> SiglipConfig:
    """Sizes from shapes; heads from `given`, else a known variant's, else So400m's 72 per head."""
    width, _, patch, _ = shape(t, VIS + "embeddings.patch_embedding.weight")
    side = math.isqrt(shape(t, VIS + "embeddings.position_embedding.weight")[0])
    cfg = SiglipConfig(width, depth(t, VIS + "encoder.layers."), 0,
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


def _named_variant(meta: Mapping[str, Any], block: str, width: int) -> tuple[str, GemmaConfig] | None:
    """The LeRobot variant config.json names for `block` with where it was said, when the tensors
    have its width; a folder of other sizes (a tiny or custom one) is read from shapes alone."""
    field = VARIANT_FIELDS[block]
    name = meta.get(field)
    if name is None:
        return None
    if name not in LEROBOT_GEMMA:
        raise WalkforgeError(f"config.json {field} is '{name}': one of {', '.join(LEROBOT_GEMMA)}")
    variant = LEROBOT_GEMMA[name]
    return (f"config.json {field} {name}", variant) if variant.width == width else None


def _disagree(block: str, field: str, said_by: str, said: Any, has: Any) -> WalkforgeError:
    return WalkforgeError(f"{block}.{field}: {said_by} says {said} but the tensors give {has}")


def _check_named(block: str, named: tuple[str, GemmaConfig], given: Mapping[str, Any],
                 has: Mapping[str, int]) -> None:
    """The named LeRobot variant's sizes against the tensors', before any head split; a field the
    overrides give replaces the variant's (one of heads, kv_heads, head_dim: the widths too)."""
    said_by, v = named
    said = {"layers": v.layers, "mlp": v.mlp, "heads × head_dim": v.heads * v.head_dim,
            "kv_heads × head_dim": v.kv_heads * v.head_dim, "vocab": v.vocab}
    split = bool({"heads", "kv_heads", "head_dim"} & set(given))
    for field, value in said.items():
        skip = field in given or (split and "×" in field) or (field == "vocab" and not has["vocab"])
        if not skip and value != has[field]:
            raise _disagree(block, field, said_by, value, has[field])


def _check_gemma(block: str, cfg: GemmaConfig, shapes: GemmaConfig, said_by: str) -> None:
    """`cfg` (the overrides applied) against the sizes read from the tensors; the projection
    widths are heads × head_dim."""
    pairs = {f: (getattr(cfg, f), getattr(shapes, f)) for f in ("width", "layers", "mlp", "cond_dim")}
    if cfg.vocab or shapes.vocab:
        pairs["vocab"] = (cfg.vocab, shapes.vocab)
    pairs["heads × head_dim"] = (cfg.heads * cfg.head_dim, shapes.heads * shapes.head_dim)
    pairs["kv_heads × head_dim"] = (cfg.kv_heads * cfg.head_dim, shapes.kv_heads * shapes.head_dim)
    pairs |= {f: (getattr(cfg, f), getattr(shapes, f)) for f in ("heads", "kv_heads", "head_dim")}
    for field, (said, has) in pairs.items():
        if said != has:
            raise _disagree(block, field, said_by, said, has)


def _infer_gemma(t: Mapping[str, torch.Tensor], block: str, vocab: int, given: Mapping[str, Any],
                 known: list[GemmaConfig], meta: Mapping[str, Any]) -> GemmaConfig:
    """Sizes from shapes, adaRMS when the norms have a `dense`; the head split as `_head_dim` says,
    from config.json's LeRobot variant when the tensors have its width. The variant (where no
    override replaces a field) and the overrides must agree with the tensors."""
    prefix = BLOCK_PREFIX[block]
    q_out, width = shape(t, prefix + "layers.0.self_attn.q_proj.weight")
    kv_out = shape(t, prefix + "layers.0.self_attn.k_proj.weight")[0]
    mlp = shape(t, prefix + "layers.0.mlp.gate_proj.weight")[0]
    dense = t.get(prefix + "layers.0.input_layernorm.dense.weight")
    named = _named_variant(meta, block, width)
    if named:
        _check_named(block, named, given, {"layers": depth(t, prefix + "layers."), "mlp": mlp,
                                           "heads × head_dim": q_out, "kv_heads × head_dim": kv_out,
                                           "vocab": vocab})
    sizes = (width, q_out, kv_out, mlp)
    same = [named[1]] if named else [
        g for g in known if (g.width, g.heads * g.head_dim, g.kv_heads * g.head_dim, g.mlp) == sizes]
    dh = _head_dim(q_out, given, same)
    if not dh or q_out % dh or kv_out % dh:
        raise WalkforgeError(f"cannot infer the head size of '{prefix}' (q {q_out}, kv {kv_out}"
                             f"{', given ' + json.dumps(dict(given)) if given else ''}): give heads and "
                             "head_dim that divide them in --config")
    shapes = GemmaConfig(width, depth(t, prefix + "layers."), q_out // dh, kv_out // dh, dh, mlp, vocab,
                         cond_dim=0 if dense is None else dense.shape[1])
    cfg = from_dict(GemmaConfig, dict(given), shapes)
    _check_gemma(block, cfg, shapes, "--config")
    return cfg



def read_folder(folder: Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], frozenset[str]]:
    """(config.json, tensors, the tensor names as saved) of a LeRobot policy folder; `kind` (pi0,
    pi05) names it in errors. The VLM's `embed_tokens`, when saved only as the `lm_head` it is
    tied to (LeRobot 0.4.x), is taken from there; when both are saved (≥ 0.5, and they may differ
    after training) the model runs on `embed_tokens`, as LeRobot does."""
    folder = Path(folder)
    meta = read_json_object(folder / "config.json", f"a LeRobot {kind} folder")
    tensors = lerobot_weights(folder, kind, PG)
    saved = frozenset(tensors)
    if LLM + "embed_tokens.weight" not in tensors and PG + "paligemma.lm_head.weight" in tensors:
        tensors[LLM + "embed_tokens.weight"] = tensors[PG + "paligemma.lm_head.weight"]
    return meta, tensors, saved


def lerobot_config(cls: type, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                   overrides: Mapping[str, Any], known: Iterable[Any], prompt_len: int,
                   **fields: Any) -> Any:
    """A pi0-family config: blocks inferred from shapes with `overrides` applied before anything
    is inferred, config.json's horizon, prompt length, steps and cameras, then `fields`; the
    overrides win over everything."""
    known = list(known)
    given = {k: overrides.get(k) or {} for k in ("vision", "llm", "expert")}
    blocks = {
        "vision": _infer_siglip(tensors, given["vision"], [v.vision for v in known]),
        "llm": _infer_gemma(tensors, "llm", shape(tensors, LLM + "embed_tokens.weight")[0], given["llm"],
                            [v.llm for v in known], meta),
        "expert": _infer_gemma(tensors, "expert", 0, given["expert"], [v.expert for v in known], meta),
    }
    data = {"num_views": len(lerobot_cameras(meta)) or 3,
            "max_prompt_len": meta.get("tokenizer_max_length", prompt_len),
            "action_horizon": meta.get("chunk_size", 50),
            "num_steps": meta.get("num_inference_steps", meta.get("num_steps", 10)), **fields,
            **{k: v for k, v in overrides.items() if k not in blocks},
            **{k: to_dict(b) for k, b in blocks.items()}}
    return from_dict(cls, data)
