"""Tiny LeRobot pi0 / pi05 policy folders in the published layout, written by the tests themselves
(no LeRobot, no hub): config.json as LeRobot 0.4.x writes it, model.safetensors without the tied
`embed_tokens`, both processor JSONs with their stats files, and a SentencePiece tokenizer trained
on the fly. Importable from any test (`from lerobot_folder import write_folder, write_tokenizer`:
tests/ is on sys.path through its conftest.py); sizes are parameters, so a full-size random folder
is `write_folder(dir, "pi0", variant="pi0")`.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from walkforge.recipes import get_recipe

PG = "model.paligemma_with_expert."
EMBED = PG + "paligemma.model.language_model.embed_tokens.weight"
LM_HEAD = PG + "paligemma.lm_head.weight"
EXPERT_LM_HEAD = PG + "gemma_expert.lm_head.weight"
HUB_TOKENIZER = "google/paligemma-3b-pt-224"
PRE, POST = "policy_preprocessor", "policy_postprocessor"
# Sentences the test tokenizer is trained on: prompts as pi0 and pi05 write them.
CORPUS = ("pick up the red block and put it in the box\n", "open the top drawer\n",
          "close the door slowly\n", "move the arm to the left\n", "stack the green cups\n",
          "Task: fold the towel, State: 128 12 255 0 64;\nAction: ")


def write_tokenizer(folder: Path, vocab: int = 320, fast: bool = False) -> Path:
    """A Gemma-like SentencePiece model (pad 0, eos 1, bos 2, unk 3, byte fallback, no
    normalisation) as `folder/tokenizer.model`; `fast` adds transformers' tokenizer.json and
    tokenizer_config.json (GemmaTokenizerFast's save). Returns `folder`."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    if fast:
        from transformers import GemmaTokenizerFast

        GemmaTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))
    return folder


@dataclass
class LeRobotFolder:
    """What `write_folder` wrote: the folder, its config.json, the model tensors (as saved) and
    the stats (every `<feature>.<stat>` of both processor files) and the compiled-size config."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    cfg: Any


def lerobot_config(kind: str, cfg: Any, cameras: tuple[str, ...], empty_cameras: int, state_dim: int,
                   action_dim: int, normalization: dict[str, str], n_action_steps: int | None = None,
                   ) -> dict[str, Any]:
    """config.json as LeRobot 0.4.x's `save_pretrained` writes it (the fields walkforge reads and
    a few it ignores); `input_features` lists the empty cameras LeRobot adds, after the real ones."""
    side = cfg.vision.image_size
    visual = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, 480, 640]} for c in cameras}
    visual |= {f"observation.images.empty_camera_{i}": {"type": "VISUAL", "shape": [3, side, side]}
               for i in range(empty_cameras)}
    return {
        "type": kind, "n_obs_steps": 1,
        "input_features": {**visual, "observation.state": {"type": "STATE", "shape": [state_dim]}},
        "output_features": {"action": {"type": "ACTION", "shape": [action_dim]}},
        "device": "cpu", "use_amp": False, "push_to_hub": False, "repo_id": None, "pretrained_path": None,
        "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m", "dtype": "float32",
        "chunk_size": cfg.action_horizon, "n_action_steps": n_action_steps or cfg.action_horizon,
        "max_state_dim": getattr(cfg, "state_dim", 32), "max_action_dim": cfg.action_dim,
        "num_inference_steps": cfg.num_steps, "time_sampling_beta_alpha": 1.5,
        "min_period": 0.004, "max_period": 4.0, "image_resolution": [side, side],
        "empty_cameras": empty_cameras, "normalization_mapping": normalization,
        "gradient_checkpointing": False, "compile_model": False, "freeze_vision_encoder": False,
        "optimizer_lr": 2.5e-05, "tokenizer_max_length": cfg.max_prompt_len,
    }


def random_tensors(recipe: Any, cfg: Any, seed: int = 0, dtype: torch.dtype = torch.float32,
                   ) -> dict[str, torch.Tensor]:
    """Seeded random weights of `cfg` under LeRobot's keys, one tensor at a time (the model is
    built on the meta device, so a full-size folder needs only its own bytes): matrices
    N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), other vectors N(0, 0.1²)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in recipe.build(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in sorted(shapes):
        shape = shapes[key]
        t = torch.randn(shape, generator=gen)
        if len(shape) >= 2:
            t /= math.sqrt(math.prod(shape[1:]))
        else:
            t = t * 0.1 + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
        tensors[recipe.key_map.to_checkpoint(key)] = t.to(dtype)
    return tensors


def stats_for(key: str, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Every stat LeRobot records for a feature, ordered as statistics are (min ≤ q01 < q99 ≤ max)."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=gen)
    std = 0.5 + torch.rand(dim, generator=gen)
    return {f"{key}.mean": mean, f"{key}.std": std, f"{key}.min": mean - 3 * std,
            f"{key}.max": mean + 3 * std, f"{key}.q01": mean - 2 * std, f"{key}.q99": mean + 2 * std,
            f"{key}.count": torch.tensor([1000.0])}


def processors(kind: str, meta: dict[str, Any], state_files: tuple[str, str]) -> tuple[dict, dict]:
    """policy_preprocessor.json and policy_postprocessor.json as LeRobot 0.4.x writes them for
    `kind`: steps by registry name with their config, the (un)normalizer's `state_file`."""
    norm = {"eps": 1e-08, "features": {**meta["input_features"], **meta["output_features"]},
            "norm_map": meta["normalization_mapping"]}
    tokenizer = {"registry_name": "tokenizer_processor", "config": {
        "max_length": meta["tokenizer_max_length"], "task_key": "task", "padding_side": "right",
        "padding": "max_length", "truncation": True, "tokenizer_name": HUB_TOKENIZER}}
    normalizer = {"registry_name": "normalizer_processor", "config": norm, "state_file": state_files[0]}
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    head = [{"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
            {"registry_name": "to_batch_processor", "config": {}}]
    if kind == "pi0":
        steps = [*head, {"registry_name": "pi0_new_line_processor", "config": {}}, tokenizer, device,
                 normalizer]
    else:
        steps = [*head, normalizer, {"registry_name": "pi05_prepare_state_tokenizer_processor_step",
                                     "config": {"max_state_dim": meta["max_state_dim"]}}, tokenizer, device]
    post = [{"registry_name": "unnormalizer_processor", "state_file": state_files[1],
             "config": {**norm, "features": meta["output_features"]}}, device]
    return {"name": PRE, "steps": steps}, {"name": POST, "steps": post}


def write_folder(folder: Path, kind: str = "pi0", cfg: Any = None, *, variant: str = "tiny",
                 cameras: tuple[str, ...] = ("base", "wrist"), empty_cameras: int = 1,
                 state_dim: int = 7, action_dim: int = 6, normalization: dict[str, str] | None = None,
                 prefix: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32,
                 tokenizer: bool = False) -> LeRobotFolder:
    """A LeRobot `kind` folder of `cfg` (default: the recipe's `variant`, with num_views set to the
    cameras): config.json, model.safetensors without `embed_tokens` (saved as the tied lm_head;
    keys without the `model.` prefix when `prefix` is false), both processor JSONs and their stats
    files, and with `tokenizer` a trained tokenizer.model in `folder/tokenizer`."""
    recipe = get_recipe(kind)
    cfg = cfg or recipe.variant(variant)
    cfg = replace(cfg, num_views=len(cameras) + empty_cameras)
    mode = "MEAN_STD" if kind == "pi0" else "QUANTILES"  # LeRobot's defaults
    normalization = normalization or {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
    meta = lerobot_config(kind, cfg, cameras, empty_cameras, state_dim, action_dim, normalization)
    tensors = random_tensors(recipe, cfg, seed, dtype)
    tensors[LM_HEAD] = tensors.pop(EMBED)  # LeRobot keeps the tied pair once, as the lm_head
    if not prefix:
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(meta, indent=4))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    stats = stats_for("observation.state", state_dim, seed + 1) | stats_for("action", action_dim, seed + 2)
    image = {f"observation.images.{cameras[0]}.{s}": torch.full((3, 1, 1), v) for s, v in (("mean", 0.5),
                                                                                           ("std", 0.25))}
    files = (f"{PRE}_step_{5 if kind == 'pi0' else 2}_normalizer_processor.safetensors",
             f"{POST}_step_0_unnormalizer_processor.safetensors")
    save_file(stats | image, str(folder / files[0]))
    save_file({k: v for k, v in stats.items() if k.startswith("action.")}, str(folder / files[1]))
    for name, data in zip((f"{PRE}.json", f"{POST}.json"), processors(kind, meta, files), strict=True):
        (folder / name).write_text(json.dumps(data, indent=4))
    if tokenizer:
        write_tokenizer(folder / "tokenizer")
    return LeRobotFolder(folder, meta, tensors, stats | image, cfg)
