"""Which LeRobot release wrote a policy folder, and what that release computes its own way.

LeRobot's processing changed between releases (docs/policy.md, "LeRobot releases"); what walkforge
must follow per release:
  0.4   pi05 writes all `max_state_dim` (padded) state dims into the prompt
  0.5   pi05 writes only the state's own dims (0.5.0); relative/absolute action steps (0.5.1,
        the relative one registered as delta_actions_processor)
  0.6   1-D visual stats saved as (C, 1, 1) in the preprocessor's file; `pretrained_revision`;
        the relative step renamed relative_actions_processor
Processor steps a folder lists (relative/absolute actions) apply whatever the release: they are
explicit. Image padding is black (−1 after the [−1, 1] map) for every release: 0.4.x padded with
−3 by mistake and 0.5.0 fixed it; walkforge follows the fix.

A folder says which release wrote it only through markers (below, newest first); a folder with
none (a model-only folder converted by hand, say) gets the newest semantics and says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from walkforge.errors import WalkforgeError

RELEASES = ("0.4", "0.5", "0.6")  # the semantics walkforge knows; 0.5.1 computes as 0.5.0
NEWEST = RELEASES[-1]


@dataclass(frozen=True)
class FolderFacts:
    """What the markers look at: config.json, the processor steps' registry names, the shapes
    of the preprocessor's stats, and the tensor names model.safetensors holds."""

    meta: Mapping[str, Any]
    steps: frozenset[str]
    stat_shapes: Mapping[str, tuple[int, ...]]
    weight_keys: frozenset[str]


def _visual_count_3d(f: FolderFacts) -> bool:
    """A camera's `count` saved as (1, 1, 1): 0.6 reshapes every 1-D visual stat to (C, 1, 1);
    mean/std/min/max were (3, 1, 1) before, so only the count tells."""
    return any(k.startswith("observation.images.") and k.endswith(".count") and len(s) == 3
               for k, s in f.stat_shapes.items())


def _embed_saved(f: FolderFacts) -> bool:
    return any(k.endswith("language_model.embed_tokens.weight") for k in f.weight_keys)


def _lm_head_only(f: FolderFacts) -> bool:
    return not _embed_saved(f) and any(k.endswith("paligemma.lm_head.weight") for k in f.weight_keys)


# (release, test, what was seen), newest first: the first that holds decides.
MARKERS: tuple[tuple[str, Callable[[FolderFacts], bool], str], ...] = (
    ("0.6", lambda f: "pretrained_revision" in f.meta, "config.json has pretrained_revision (since 0.6.0)"),
    ("0.6", _visual_count_3d, "the preprocessor's camera count stat is (1, 1, 1) (since 0.6.0)"),
    ("0.6", lambda f: "relative_actions_processor" in f.steps,
     "a relative_actions_processor step (0.5.1 named it delta_actions_processor)"),
    ("0.5", lambda f: "delta_actions_processor" in f.steps or "use_relative_actions" in f.meta,
     "relative actions in config.json or a delta_actions_processor step (since 0.5.1)"),
    ("0.5", _embed_saved, "model.safetensors holds embed_tokens (0.4.x saved only the tied lm_head)"),
    ("0.4", _lm_head_only, "model.safetensors holds the tied lm_head without embed_tokens (0.4.x)"),
)


@dataclass(frozen=True)
class Release:
    """The semantics a bundle's processors follow: `version` (one of RELEASES), `how` it was
    decided, and whether the folder said so (`certain`)."""

    version: str
    how: str
    certain: bool

    def entry(self) -> dict[str, Any]:
        return {"release": self.version, "how": self.how, "certain": self.certain}

    def prompt_state_dims(self, state_dim: int, max_state_dim: int) -> int:
        """How many state dims pi05 writes into its prompt."""
        return max_state_dim if self.version == "0.4" else state_dim


def decide(facts: FolderFacts, forced: str | None = None) -> Release:
    """`--lerobot-version` when given, else the first marker that holds, else the newest."""
    if forced is not None:
        return Release(check_version(forced), f"--lerobot-version {forced}", True)
    for version, holds, seen in MARKERS:
        if holds(facts):
            return Release(version, f"read from the folder: {seen}", True)
    return Release(NEWEST, f"the folder shows no marker of the LeRobot release that wrote it: the newest "
                           f"({NEWEST}) semantics apply; --lerobot-version X.Y overrides", False)


def check_version(version: str) -> str:
    """A `--lerobot-version` value as a known release 'X.Y' (0.5.1 → 0.5)."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", str(version).strip())
    short = f"{int(match[1])}.{int(match[2])}" if match else None
    if short not in RELEASES:
        raise WalkforgeError(f"--lerobot-version {version}: want one of {', '.join(RELEASES)} (X.Y)")
    return short
