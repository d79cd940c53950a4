"""LeRobot SmolVLA checkpoints: the key map onto SmolVLAModel and the config from a policy's
config.json plus the SmolVLM2 folder's config.json (the policy folder names the VLM by hub id
only; LeRobot builds it from that config, `load_vlm_weights` False, and every weight it runs on
is in the policy's model.safetensors).

Keys (LeRobot v0.6.1, `VLAFlowMatching` under the policy's `model.`):
    model.vlm_with_expert.vlm.model.vision_model.…     → vision.…      (SigLIP names)
    model.vlm_with_expert.vlm.model.connector.…        → connector.…   (modality_projection.proj)
    model.vlm_with_expert.vlm.model.text_model.…       → llm.…         (LlamaModel names)
    model.vlm_with_expert.lm_expert.…                  → expert.…      (LlamaModel, no embed_tokens)
    model.{state_proj,action_*,…}.…                    → the heads
    model.vlm_with_expert.vlm.lm_head.weight           ignored (never makes actions)
LeRobot cuts `text_model.layers` to the first `num_vlm_layers` before anything is saved, so only
the kept layers are in the file; `text_model.norm` is saved (and loaded, unused: LeRobot applies
it to the prefix output that nothing reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.llama import LlamaConfig
from walkforge.recipes.blocks.siglip import SiglipConfig
from walkforge.recipes.configs import from_dict, read_json_object
from walkforge.recipes.lerobot import PolicyKind, lerobot_cameras, lerobot_policy, lerobot_weights
from walkforge.recipes.smolvla.config import ACTION_HEADS, SmolVLAConfig, expert_mlp
from walkforge.recipes.weights import CheckpointRead, KeyMap

VLM = "model.vlm_with_expert.vlm.model."
EXPERT = "model.vlm_with_expert.lm_expert."
KEY_MAP = KeyMap(
    prefixes=((VLM + "vision_model.", "vision."), (VLM + "connector.", "connector."),
              (VLM + "text_model.", "llm."), (EXPERT, "expert."),
              *((f"model.{h}.", f"{h}.") for h in ACTION_HEADS)),
    ignore=(r"(^|\.)lm_head\.weight$",),
)

# transformers' SmolVLMConfig defaults, for the fields a SmolVLM config.json leaves out
# (SmolVLMVisionConfig's; scale_factor 2; the text model a LlamaConfig with rms_norm_eps 1e-5).
VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 16, "image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-6}
TEXT_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "rms_norm_eps": 1e-5, "vocab_size": 32000}
LEROBOT_ROPE_BASE = 10000.0  # smolvlm_with_expert.apply_rope's max_wavelength; rope_theta is ignored


def smolvla_config(meta: Mapping[str, Any], vlm: Mapping[str, Any],
                   overrides: Mapping[str, Any] | None = None) -> SmolVLAConfig:
    """The compiled sizes from the policy's config.json (`meta`) and the SmolVLM2 folder's
    config.json (`vlm`), as LeRobot's SmolVLMWithExpertModel derives them; `overrides` (the
    `--config` JSON, SmolVLAConfig fields) win, field by field."""
    _check_supported(meta)
    v = {**VISION_DEFAULTS, **vlm.get("vision_config", {})}
    t = {**TEXT_DEFAULTS, **vlm.get("text_config", {})}
    heads = int(t["num_attention_heads"])
    kept = int(meta.get("num_vlm_layers", 16))
    kept = kept if kept > 0 else int(t["num_hidden_layers"])
    llm = LlamaConfig(width=int(t["hidden_size"]), layers=min(kept, int(t["num_hidden_layers"])), heads=heads,
                      kv_heads=int(t.get("num_key_value_heads") or heads),
                      head_dim=int(t.get("head_dim") or int(t["hidden_size"]) // heads),
                      mlp=int(t["intermediate_size"]), vocab=int(t["vocab_size"]),
                      eps=float(t["rms_norm_eps"]), rope_base=LEROBOT_ROPE_BASE)
    width = int(llm.width * float(meta.get("expert_width_multiplier", 0.75)))
    expert = LlamaConfig(width=width, layers=llm.layers, heads=llm.heads, kv_heads=llm.kv_heads,
                         head_dim=llm.head_dim, mlp=expert_mlp(width), eps=llm.eps,
                         rope_base=LEROBOT_ROPE_BASE)
    vision = SiglipConfig(width=int(v["hidden_size"]), layers=int(v["num_hidden_layers"]),
                          heads=int(v["num_attention_heads"]), mlp=int(v["intermediate_size"]),
                          patch=int(v["patch_size"]), image_size=int(v["image_size"]),
                          eps=float(v["layer_norm_eps"]))
    cross = "cross" in str(meta.get("attention_mode", "cross_attn"))
    cfg = SmolVLAConfig(
        vision=vision, llm=llm, expert=expert, scale_factor=int(vlm.get("scale_factor", 2)),
        num_views=len(lerobot_cameras(meta)) or 3,
        max_prompt_len=int(meta.get("tokenizer_max_length", 48)),
        action_horizon=int(meta.get("chunk_size", 50)), action_dim=int(meta.get("max_action_dim", 32)),
        state_dim=int(meta.get("max_state_dim", 32)), num_steps=int(meta.get("num_steps", 10)),
        self_attn_every_n_layers=int(meta.get("self_attn_every_n_layers", 2)) if cross else 1,
    )
    _check_resize(meta, cfg.vision.image_size)
    return from_dict(SmolVLAConfig, dict(overrides or {}), cfg)


def _check_supported(meta: Mapping[str, Any]) -> None:
    """LeRobot settings this recipe does not compile, each a one-line error."""
    experts = int(meta.get("num_expert_layers", -1))
    kept = int(meta.get("num_vlm_layers", 16))
    if experts > 0 and experts != kept:
        raise WalkforgeError(f"smolvla: num_expert_layers {experts} ≠ num_vlm_layers {kept} (an expert "
                             "layer per several VLM layers) is not supported")
    if meta.get("add_image_special_tokens"):
        raise WalkforgeError("smolvla: add_image_special_tokens is not supported")
    if (meta.get("min_period", 4e-3), meta.get("max_period", 4.0)) != (4e-3, 4.0):
        raise WalkforgeError("smolvla: a time embedding other than min_period 4e-3, max_period 4.0 "
                             "is not supported")


def _check_resize(meta: Mapping[str, Any], image_size: int) -> None:
    """LeRobot resizes (with padding) to `resize_imgs_with_padding` (width, height); the compiled
    tower takes square images of its own size."""
    resize = meta.get("resize_imgs_with_padding", [512, 512])
    if resize is None or list(resize) != [image_size, image_size]:
        raise WalkforgeError(f"smolvla: resize_imgs_with_padding {resize} but the vision tower takes "
                             f"{image_size}×{image_size} images")


POLICY = PolicyKind(
    type="smolvla",
    normalization={"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    preprocessor=("smolvla_new_line_processor", "tokenizer_processor", "normalizer_processor"),
    bos=False, image_pad="left_top", prompt_padding="longest",
)
"""LeRobot's SmolVLA: SmolVLM2's tokenizer puts no BOS first, prompts pad to the longest task,
frames are padded on the left and top (docs/model_facts.md "SmolVLA")."""


def read_checkpoint(folder: Path, overrides: Mapping[str, Any] | None = None, *,
                    tokenizer: Path | None = None, lerobot_version: str | None = None,
                    processors: Path | None = None) -> CheckpointRead:
    """Read a LeRobot SmolVLA folder → (config, tensors) with the manifest's "policy" entry and
    its stats file (recipes/lerobot.py). The sizes come from the SmolVLM2 folder handed over as
    `tokenizer` (its config.json; the policy's config.json names it only by hub id) and the
    policy's config.json (`smolvla_config`); `overrides` (the `--config` JSON) win."""
    folder = Path(folder)
    meta = read_json_object(folder / "config.json", "a LeRobot smolvla folder")
    if meta.get("type", "smolvla") != "smolvla":
        raise WalkforgeError(f"{folder}: a LeRobot '{meta['type']}' folder, not smolvla (compile it with the "
                             f"{meta['type']} recipe)")
    hub = meta.get("vlm_model_name", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct")
    if tokenizer is None:
        raise WalkforgeError(f"smolvla: give --tokenizer DIR, a local copy of {hub} (its config.json "
                             "gives the VLM's sizes and head counts, its tokenizer the prompt ids)")
    vlm = read_json_object(Path(tokenizer) / "config.json", f"the SmolVLM2 folder ({hub}) --tokenizer names")
    tensors = lerobot_weights(folder, "smolvla", EXPERT)
    cfg = smolvla_config(meta, vlm, overrides)
    policy, files = lerobot_policy(folder, meta, cfg, POLICY, weight_keys=frozenset(tensors),
                                   lerobot_version=lerobot_version, processors=processors)
    return CheckpointRead(cfg, tensors, {"policy": policy}, files)
