"""Folders of LeRobot 0.4.x give what they gave in walkforge 0.3.4, bit for bit: the walk inputs the
processors make of raw observations (frames needing padding, a missing camera, pi0.5's 32 padded
state bins) hash to what 0.3.4's processors made (tests/fixtures/lerobot/walk_inputs_0.3.4.json,
computed by 0.3.4's code on the same folders). The engines did not change, so neither do the actions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from lerobot_folder import write_folder, write_tokenizer

from walkforge.recipes import get_recipe
from walkforge.recipes.lerobot import bundle_tokenizer
from walkforge.runtimes.processors import PolicyProcessor

PINS = json.loads((Path(__file__).parents[1] / "fixtures" / "lerobot" / "walk_inputs_0.3.4.json").read_text())


def observations(rng: np.random.Generator) -> dict[str, dict]:
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    wrist = rng.random((3, 97, 203)).astype(np.float32)
    state = rng.standard_normal(6).astype(np.float32)
    return {"both": {"observation.images.base": base, "observation.images.wrist": wrist,
                     "observation.state": state, "task": "pick up the red block"},
            "no wrist": {"observation.images.base": base, "observation.state": state * 2,
                         "task": "open_the top\ndrawer"}}


def proc_cfg(kind: str):
    return replace(get_recipe(kind).variant("tiny"), max_prompt_len=200)  # pi05's prompt holds 32 bins


def processor(kind: str, tmp: Path) -> PolicyProcessor:
    """The processors of a 0.4-style folder (tests/lerobot_folder.py) as a bundle would hold them."""
    cfg = proc_cfg(kind)
    write_folder(tmp / "folder", kind, cfg, state_dim=6, action_dim=6)
    read = get_recipe(kind).read_checkpoint(tmp / "folder", {})
    entry, tokenizer_files = bundle_tokenizer(read.manifest, write_tokenizer(tmp / "tok", fast=True), read[0])
    for rel, src in {**read.files, **tokenizer_files}.items():
        (tmp / "b" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "b" / rel).write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
    assert entry["policy"]["lerobot"]["release"] == "0.4"
    return PolicyProcessor(entry["policy"], lambda rel: (tmp / "b" / rel).read_bytes())


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_0_4_folders_make_the_walk_inputs_0_3_4_made(kind, tmp_path):
    proc = processor(kind, tmp_path)
    walks_take = {s.name for w in get_recipe(kind).walks(get_recipe(kind).build(proc_cfg(kind)),
                                                         proc_cfg(kind)).nodes for s in w.inputs}
    for name, obs in observations(np.random.default_rng(5)).items():
        feeds, _ = proc.preprocess(obs)
        got = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:16]
               for k, v in sorted(feeds.items()) if k in walks_take}  # the inputs its walks take
        assert got == PINS[f"{kind}/{name}"], name
