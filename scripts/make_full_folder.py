"""Write a full-size LeRobot pi0 / pi05 / smolvla policy folder with seeded random weights, as LeRobot
publishes it: model.safetensors in bf16 (SigLIP patch/position embeddings and the Gemma RMSNorm
weights in fp32, as LeRobot keeps them), the VLM's `embed_tokens` saved only as the tied
`paligemma.lm_head`, config.json, both processor JSONs and their stats files.

`--kind smolvla` writes a LeRobot 0.6.1 SmolVLA folder instead (config.json, model.safetensors
under LeRobot's keys with `text_model.embed_tokens` and the untied `vlm.lm_head` both saved, fp32 as
save_pretrained writes an fp32 policy unless --dtype bfloat16, the pipelines of
processor_smolvla.py with their stats files; 2 cameras, MEAN_STD) and beside it, in `--vlm DIR`
(default OUT-vlm), a SmolVLM2-500M-style folder: config.json with the published sizes (the
variant's), processor_config.json, and the test fixture's byte-level BPE tokenizer
(tests/fixtures/lerobot/smolvlm2-tiny, 320 ids ≤ the 49280 of the vocab). Compile it with
`walkforge compile smolvla --checkpoint OUT --tokenizer OUT-vlm`.

The weights are drawn and written one tensor at a time (compiler/weights_file.py), so the folder
(7 GB for pi0) needs no more memory than its largest tensor. pi0/pi05's JSON side comes from the
tests' folder writer (tests/lerobot_folder.py), so the full-size folder and the tiny test folders
have one layout; smolvla's follows the LeRobot-written fixture (tests/fixtures/lerobot/v0.6.1/smolvla).

    python3 scripts/make_full_folder.py /tmp/pi0_full [--kind pi0|pi05|smolvla] [--seed 0] [--variant tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / d) for d in ("tests", "")]  # + walkforge

from lerobot_folder import EMBED, LM_HEAD, POST, PRE, lerobot_config, processors, stats_for  # noqa: E402

from walkforge.compiler.weights_file import write_safetensors  # noqa: E402
from walkforge.recipes import get_recipe  # noqa: E402

CAMERAS = ("base", "left_wrist", "right_wrist")  # 3 views, as the full-size pi0 is compiled
STATE_DIM, ACTION_DIM = 14, 14  # a two-arm robot
ROOT = Path(__file__).resolve().parent.parent


def kept_fp32(module_key: str) -> bool:
    """LeRobot's bf16 save keeps these in fp32: SigLIP's patch and position embeddings and the
    Gemma RMSNorm scales (VLM and expert)."""
    if module_key.startswith("vision.embeddings."):
        return True
    gemma = module_key.startswith(("llm.", "expert."))
    return gemma and module_key.endswith("norm.weight")


def draw(shape: tuple[int, ...], key: str, gen: torch.Generator) -> torch.Tensor:
    """Matrices N(0, 1/fan_in), norm scales N(0, 0.1²) (Gemma's are 1 + w), other vectors N(0, 0.1²)."""
    t = torch.randn(shape, generator=gen)
    return t / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else t * 0.1


def write_weights(path: Path, recipe, cfg, seed: int) -> int:
    """model.safetensors of `cfg` under LeRobot's keys, one tensor at a time; returns its bytes."""
    with torch.device("meta"):
        state = recipe.build(cfg).state_dict()
    specs, keys = {}, {}
    for module_key, t in state.items():
        ckpt = recipe.key_map.to_checkpoint(module_key)
        ckpt = LM_HEAD if ckpt == EMBED else ckpt  # LeRobot keeps the tied pair once, as the lm_head
        specs[ckpt] = torch.empty(t.shape, dtype=torch.float32 if kept_fp32(module_key) else torch.bfloat16,
                                  device="meta")
        keys[ckpt] = module_key

    def tensor_of(name: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 100_003 + sorted(specs).index(name))
        return draw(tuple(specs[name].shape), keys[name], gen).to(specs[name].dtype)

    write_safetensors(path, specs, tensor_of)
    return path.stat().st_size


# --- smolvla --------------------------------------------------------------------------------------

SMOLVLA_CAMERAS = ("base", "wrist")  # observation.images.<name>, 2 views
SMOLVLA_STATE_DIM = SMOLVLA_ACTION_DIM = 6  # an SO-100 arm, as smolvla_base's dataset
SMOLVLM2_HUB = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
SMOLVLM2_TEXT_LAYERS = 32  # SmolVLM2-500M's text model; SmolVLA keeps the first num_vlm_layers (16)
TINY_VLM = ROOT / "tests" / "fixtures" / "lerobot" / "smolvlm2-tiny"
SMOLVLA_NORM = {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}  # LeRobot's defaults
VLM_LM_HEAD = "model.vlm_with_expert.vlm.lm_head.weight"


def smolvla_meta(cfg, cameras: tuple[str, ...], state_dim: int, action_dim: int, vlm_name: str) -> dict:
    """config.json as LeRobot 0.6.1's save_pretrained writes a SmolVLAConfig (every field, in its
    order; tests/fixtures/lerobot/v0.6.1/smolvla/folder/config.json is one it wrote)."""
    side = cfg.vision.image_size
    visual = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, 480, 640]} for c in cameras}
    return {
        "type": "smolvla", "n_obs_steps": 1,
        "input_features": {**visual, "observation.state": {"type": "STATE", "shape": [state_dim]}},
        "output_features": {"action": {"type": "ACTION", "shape": [action_dim]}},
        "device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": True, "repo_id": None,
        "private": None, "tags": None, "license": None, "pretrained_path": None, "pretrained_revision": None,
        "chunk_size": cfg.action_horizon, "n_action_steps": cfg.action_horizon,
        "normalization_mapping": SMOLVLA_NORM,
        "max_state_dim": cfg.state_dim, "max_action_dim": cfg.action_dim,
        "resize_imgs_with_padding": [side, side], "empty_cameras": 0, "adapt_to_pi_aloha": False,
        "use_delta_joint_actions_aloha": False, "tokenizer_max_length": cfg.max_prompt_len,
        "num_steps": cfg.num_steps, "use_cache": True, "freeze_vision_encoder": True,
        "train_expert_only": True, "train_state_proj": True, "optimizer_lr": 0.0001,
        "optimizer_betas": [0.9, 0.95], "optimizer_eps": 1e-08, "optimizer_weight_decay": 1e-10,
        "optimizer_grad_clip_norm": 10, "scheduler_warmup_steps": 1000, "scheduler_decay_steps": 30000,
        "scheduler_decay_lr": 2.5e-06, "vlm_model_name": vlm_name, "load_vlm_weights": False,
        "add_image_special_tokens": False,
        "attention_mode": "cross_attn" if cfg.cross_layers else "self_attn", "prefix_length": -1,
        "pad_language_to": "longest", "num_expert_layers": -1, "num_vlm_layers": cfg.llm.layers,
        "self_attn_every_n_layers": cfg.self_attn_every_n_layers,
        "expert_width_multiplier": cfg.expert.width / cfg.llm.width, "min_period": 0.004, "max_period": 4.0,
        "rtc_config": None, "compile_model": False, "compile_mode": "max-autotune",
    }


def smolvla_processors(meta: dict, state_files: tuple[str, str]) -> tuple[dict, dict]:
    """policy_preprocessor.json / policy_postprocessor.json as LeRobot 0.6.1's
    make_smolvla_pre_post_processors saves them: rename, to_batch, new line, tokenizer (padding
    "longest", right, max_length = tokenizer_max_length), device, normalizer (step 5);
    post: unnormalizer (step 0), device."""
    features = {**meta["input_features"], **meta["output_features"]}
    norm = {"eps": 1e-08, "features": features, "norm_map": meta["normalization_mapping"]}
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    pre = [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        {"registry_name": "tokenizer_processor", "config": {
            "max_length": meta["tokenizer_max_length"], "task_key": "task", "padding_side": "right",
            "padding": meta["pad_language_to"], "truncation": True,
            "tokenizer_name": meta["vlm_model_name"]}},
        device,
        {"registry_name": "normalizer_processor", "config": norm, "state_file": state_files[0]},
    ]
    post = [{"registry_name": "unnormalizer_processor",
             "config": {**norm, "features": meta["output_features"]}, "state_file": state_files[1]}, device]
    return {"name": PRE, "steps": pre}, {"name": POST, "steps": post}


def smolvla_stats(cameras: tuple[str, ...], state_dim: int, action_dim: int, seed: int
                  ) -> dict[str, torch.Tensor]:
    """Every stat of every feature, as LeRobot saves them in both stats files (images (3, 1, 1))."""
    stats = stats_for("observation.state", state_dim, seed + 1) | stats_for("action", action_dim, seed + 2)
    for i, cam in enumerate(cameras):
        mean = 0.3 + 0.3 * torch.rand((3, 1, 1), generator=torch.Generator().manual_seed(seed + 10 + i))
        key = f"observation.images.{cam}"
        stats |= {f"{key}.mean": mean, f"{key}.std": torch.full((3, 1, 1), 0.25),
                  f"{key}.min": torch.zeros(3, 1, 1), f"{key}.max": torch.ones(3, 1, 1),
                  f"{key}.count": torch.full((1, 1, 1), 1000.0)}
    return stats


def smolvlm2_config(cfg) -> dict:
    """A SmolVLMConfig config.json of `cfg`'s sizes (SmolVLM2-500M-Video-Instruct's for the
    published variant: the fields walkforge's smolvla_config reads, and SmolVLM's others); the
    special token ids are the bundled tokenizer's (smolvlm2-tiny/config.json's)."""
    tiny = json.loads((TINY_VLM / "config.json").read_text())
    text_layers = max(SMOLVLM2_TEXT_LAYERS * cfg.llm.layers // 16, cfg.llm.layers)
    text = {**tiny["text_config"], "hidden_size": cfg.llm.width, "intermediate_size": cfg.llm.mlp,
            "num_hidden_layers": text_layers, "num_attention_heads": cfg.llm.heads,
            "num_key_value_heads": cfg.llm.kv_heads, "head_dim": cfg.llm.head_dim,
            "vocab_size": cfg.llm.vocab, "rms_norm_eps": cfg.llm.eps}
    vision = {**tiny["vision_config"], "hidden_size": cfg.vision.width, "intermediate_size": cfg.vision.mlp,
              "num_hidden_layers": cfg.vision.layers, "num_attention_heads": cfg.vision.heads,
              "patch_size": cfg.vision.patch, "image_size": cfg.vision.image_size,
              "layer_norm_eps": cfg.vision.eps}
    return {**tiny, "scale_factor": cfg.scale_factor, "text_config": text, "vision_config": vision,
            "_name_or_path": SMOLVLM2_HUB}


def write_smolvlm2(folder: Path, cfg) -> None:
    """The VLM folder `--tokenizer` names: config.json, processor_config.json (images at the
    tower's size, image_seq_len = its image tokens), the fixture's tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY_VLM / name, folder / name)
    vocab = len(json.loads((TINY_VLM / "tokenizer.json").read_text())["model"]["vocab"])
    if vocab > cfg.llm.vocab:
        raise SystemExit(f"{TINY_VLM}: its tokenizer has {vocab} ids > the variant's vocab {cfg.llm.vocab}")
    (folder / "config.json").write_text(json.dumps(smolvlm2_config(cfg), indent=2))
    proc = json.loads((TINY_VLM / "processor_config.json").read_text())
    side = {"longest_edge": cfg.vision.image_size}
    for sub in ("image_processor", "video_processor"):
        proc[sub] |= {"size": side, "max_image_size": side}
    proc["image_seq_len"] = cfg.image_tokens
    (folder / "processor_config.json").write_text(json.dumps(proc, indent=2))


def write_smolvla_weights(path: Path, recipe, cfg, seed: int, dtype: torch.dtype) -> int:
    """model.safetensors of `cfg` under LeRobot's keys (KEY_MAP inverted, plus the never-read
    `vlm.lm_head`, untied as SmolVLM2 saves it), one tensor at a time; returns its bytes.
    Llama RMSNorm and SigLIP LayerNorm scales are 1 + N(0, 0.1²) (they multiply, unlike Gemma's 1 + w)."""
    with torch.device("meta"):
        state = recipe.build(cfg).state_dict()
    shapes = {recipe.key_map.to_checkpoint(k): tuple(t.shape) for k, t in state.items()}
    shapes[VLM_LM_HEAD] = (cfg.llm.vocab, cfg.llm.width)
    specs = {k: torch.empty(s, dtype=dtype, device="meta") for k, s in shapes.items()}
    index = {k: i for i, k in enumerate(sorted(specs))}

    def tensor_of(name: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 100_003 + index[name])
        t = draw(shapes[name], name, gen)
        if len(shapes[name]) == 1 and "norm" in name and name.endswith(".weight"):
            t = t + 1.0
        return t.to(dtype)

    write_safetensors(path, specs, tensor_of)
    return path.stat().st_size


def smolvla_main(args: argparse.Namespace) -> None:
    from walkforge.recipes.smolvla.checkpoint import smolvla_config

    recipe = get_recipe("smolvla")
    cfg = replace(recipe.variant(args.variant or "smolvla"), num_views=len(SMOLVLA_CAMERAS))
    out, vlm = args.out, args.vlm or args.out.with_name(args.out.name + "-vlm")
    meta = smolvla_meta(cfg, SMOLVLA_CAMERAS, SMOLVLA_STATE_DIM, SMOLVLA_ACTION_DIM, SMOLVLM2_HUB)
    write_smolvlm2(vlm, cfg)
    derived = smolvla_config(meta, json.loads((vlm / "config.json").read_text()))
    if derived != cfg:  # e.g. tiny's expert MLP is not LeRobot's derivation: draw what LeRobot would build
        print(f"note: LeRobot derives {derived.expert} from these config.json files, not the variant's "
              f"{cfg.expert}; the weights follow LeRobot")
        cfg = derived
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(meta, indent=4))
    dtype = getattr(torch, args.dtype)
    size = write_smolvla_weights(out / "model.safetensors", recipe, cfg, args.seed, dtype)
    stats = smolvla_stats(SMOLVLA_CAMERAS, SMOLVLA_STATE_DIM, SMOLVLA_ACTION_DIM, args.seed)
    files = (f"{PRE}_step_5_normalizer_processor.safetensors",
             f"{POST}_step_0_unnormalizer_processor.safetensors")
    save_file(stats, str(out / files[0]))
    save_file(stats, str(out / files[1]))
    for name, data in zip((f"{PRE}.json", f"{POST}.json"), smolvla_processors(meta, files), strict=True):
        (out / name).write_text(json.dumps(data, indent=2))
    print(f"{out}: smolvla {args.variant or 'smolvla'}, model.safetensors {size / 1e9:.2f} GB "
          f"({args.dtype}); the VLM folder (--tokenizer) {vlm}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", choices=("pi0", "pi05", "smolvla"), default="pi0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", help="sizes (default: the full-size variant of --kind)")
    parser.add_argument("--vlm", type=Path, help="smolvla: where the SmolVLM2 folder goes (default: OUT-vlm)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="smolvla: model.safetensors dtype")
    args = parser.parse_args()
    if args.kind == "smolvla":
        smolvla_main(args)
        return
    recipe = get_recipe(args.kind)
    cfg = replace(recipe.variant(args.variant or args.kind), num_views=len(CAMERAS))
    mode = "MEAN_STD" if args.kind == "pi0" else "QUANTILES"  # LeRobot's defaults
    meta = lerobot_config(args.kind, cfg, CAMERAS, 0, STATE_DIM, ACTION_DIM,
                          {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode})
    meta["dtype"] = "bfloat16"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(meta, indent=4))
    size = write_weights(out / "model.safetensors", recipe, cfg, args.seed)
    stats = stats_for("observation.state", STATE_DIM, args.seed + 1) | stats_for("action", ACTION_DIM,
                                                                                  args.seed + 2)
    files = (f"{PRE}_step_{5 if args.kind == 'pi0' else 2}_normalizer_processor.safetensors",
             f"{POST}_step_0_unnormalizer_processor.safetensors")
    save_file(stats, str(out / files[0]))
    save_file({k: v for k, v in stats.items() if k.startswith("action.")}, str(out / files[1]))
    for name, data in zip((f"{PRE}.json", f"{POST}.json"), processors(args.kind, meta, files), strict=True):
        (out / name).write_text(json.dumps(data, indent=4))
    print(f"{out}: {args.kind}, model.safetensors {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
