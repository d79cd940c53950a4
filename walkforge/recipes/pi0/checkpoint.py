"""LeRobot pi0 checkpoints: the key map onto Pi0Model and reading a folder (config.json +
model.safetensors); the PaliGemma layout and size inference are recipes/blocks/paligemma_folder.py,
the robot side, processors and stats recipes/lerobot.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from walkforge.recipes.blocks.paligemma_folder import (
    LM_HEADS,
    PALIGEMMA_PREFIXES,
    lerobot_config,
    read_folder,
)
from walkforge.recipes.lerobot import PolicyKind, lerobot_policy, shape
from walkforge.recipes.pi0.config import ACTION_HEADS, VARIANTS, Pi0Config
from walkforge.recipes.weights import CheckpointRead, KeyMap

POLICY = PolicyKind(
    type="pi0",
    normalization={"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    preprocessor=("pi0_new_line_processor", "tokenizer_processor", "normalizer_processor"),
)
"""LeRobot's pi0: PaliGemma's tokenizer puts BOS first, frames are padded in the centre."""

KEY_MAP = KeyMap(
    prefixes=(*PALIGEMMA_PREFIXES, *((f"model.{h}.", f"{h}.") for h in ACTION_HEADS)),
    ignore=LM_HEADS,
)


def read_checkpoint(folder: Path, overrides: Mapping[str, Any] | None = None, *,
                    lerobot_version: str | None = None, processors: Path | None = None) -> CheckpointRead:
    """Read a LeRobot pi0 folder → (config, tensors) with the manifest's "policy" entry and its
    stats file (recipes/lerobot.py; `lerobot_version` and `processors` as `lerobot_policy` takes them).

    Sizes come from config.json's variants where the tensors have them, else from tensor shapes;
    horizon, prompt length, steps and cameras from config.json; `overrides` (the `--config`
    JSON) are applied before any size is inferred, and win.
    """
    meta, tensors, saved = read_folder(folder, "pi0")
    cfg = lerobot_config(Pi0Config, meta, tensors, overrides or {}, VARIANTS.values(), 48,
                         action_dim=shape(tensors, "model.action_in_proj.weight")[1],
                         state_dim=shape(tensors, "model.state_proj.weight")[1])
    policy, files = lerobot_policy(Path(folder), meta, cfg, POLICY, weight_keys=saved,
                                   lerobot_version=lerobot_version, processors=processors)
    return CheckpointRead(cfg, tensors, {"policy": policy}, files)
