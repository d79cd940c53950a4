"""LeRobot pi05 checkpoints: the key map onto Pi05Model, and reading a folder (config.json +
model.safetensors, 813 tensors at full size; the policy entry as pi0's, recipes/lerobot.py).

The layout is pi0's (the same VLM, projector and expert prefixes; sizes inferred the same way,
`--config` overrides first — recipes/blocks/paligemma_folder.py) with these differences: no `state_proj`,
`model.time_mlp_{in,out}` instead of `model.action_time_mlp_{in,out}`, and every expert norm is
adaRMS: `…gemma_expert.model.layers.N.{input,post_attention}_layernorm.dense.{weight,bias}` and
`…gemma_expert.model.norm.dense.*` (3·width × width) instead of a `weight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.paligemma_folder import (
    EXP,
    LM_HEADS,
    PALIGEMMA_PREFIXES,
    lerobot_config,
    read_folder,
)
from walkforge.recipes.lerobot import PolicyKind, lerobot_policy, shape
from walkforge.recipes.pi05.config import ACTION_HEADS, VARIANTS, Pi05Config
from walkforge.recipes.weights import CheckpointRead, KeyMap

POLICY = PolicyKind(
    type="pi05",
    normalization={"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"},
    preprocessor=("normalizer_processor", "pi05_prepare_state_tokenizer_processor_step",
                  "tokenizer_processor"),
)
"""LeRobot's pi05: the state normalised into the prompt text; BOS first, frames padded in the centre."""

KEY_MAP = KeyMap(
    prefixes=(*PALIGEMMA_PREFIXES, *((f"model.{h}.", f"{h}.") for h in ACTION_HEADS)),
    ignore=LM_HEADS,
)


def read_checkpoint(folder: Path, overrides: Mapping[str, Any] | None = None, *,
                    lerobot_version: str | None = None, processors: Path | None = None) -> CheckpointRead:
    """Read a LeRobot pi05 folder → (config, tensors) with the manifest's "policy" entry and its
    stats file (recipes/lerobot.py).

    Sizes as pi0's reader infers them; horizon, prompt length (default 200), steps and cameras
    from config.json; `overrides` (the `--config` JSON) are applied before any size is inferred,
    and win.
    """
    meta, tensors, saved = read_folder(folder, "pi05")
    if meta.get("type", "pi05") != "pi05" or "model.state_proj.weight" in tensors:
        raise WalkforgeError(f"{folder}: a LeRobot '{meta.get('type', 'pi0')}' folder, not pi05 "
                             "(compile it with the pi0 recipe)")
    shape(tensors, EXP + "norm.dense.weight", "pi05")  # adaRMS expert: pi0.5's, not pi0's
    cfg = lerobot_config(Pi05Config, meta, tensors, overrides or {}, VARIANTS.values(), 200,
                         action_dim=shape(tensors, "model.action_in_proj.weight", "pi05")[1])
    policy, files = lerobot_policy(Path(folder), meta, cfg, POLICY, weight_keys=saved,
                                   lerobot_version=lerobot_version, processors=processors)
    return CheckpointRead(cfg, tensors, {"policy": policy}, files)
