"""Write a full-size LeRobot pi0 / pi05 policy folder with seeded random weights, as LeRobot
publishes it: model.safetensors in bf16 (SigLIP patch/position embeddings and the Gemma RMSNorm
weights in fp32, as LeRobot keeps them), the VLM's `embed_tokens` saved only as the tied
`paligemma.lm_head`, config.json, both processor JSONs and their stats files.

The weights are drawn and written one tensor at a time (compiler/weights_file.py), so the folder
(7 GB for pi0) needs no more memory than its largest tensor. The JSON side comes from the tests'
folder writer (tests/lerobot_folder.py), so the full-size folder and the tiny test folders have
one layout.

    python3 scripts/make_full_folder.py /tmp/pi0_full [--kind pi0|pi05] [--seed 0] [--variant tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lerobot_folder import EMBED, LM_HEAD, POST, PRE, lerobot_config, processors, stats_for  # noqa: E402

from walkforge.compiler.weights_file import write_safetensors  # noqa: E402
from walkforge.recipes import get_recipe  # noqa: E402

CAMERAS = ("base", "left_wrist", "right_wrist")  # 3 views, as the full-size pi0 is compiled
STATE_DIM, ACTION_DIM = 14, 14  # a two-arm robot


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", choices=("pi0", "pi05"), default="pi0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", help="sizes (default: the full-size variant of --kind)")
    args = parser.parse_args()
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
