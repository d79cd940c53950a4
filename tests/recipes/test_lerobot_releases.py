"""Today's LeRobot, rule by rule (hand-derived; the fixtures LeRobot itself wrote are in
tests/runtimes/test_lerobot_parity.py): which release a folder's markers name, relative actions
and their joint mask, stats compared by value, pi0.5's state prompt per release, model-only
folders and `--processors`, embed_tokens over lm_head."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot_folder import EMBED, LM_HEAD, POST, PRE, write_folder
from safetensors.torch import load_file, save_file

from walkforge.artifacts.manifest import legacy_steps
from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.recipes.lerobot import default_policy, relative_actions, relative_mask
from walkforge.recipes.lerobot_release import NEWEST, FolderFacts, check_version, decide
from walkforge.recipes.pi0.checkpoint import POLICY as PI0
from walkforge.recipes.pi05.checkpoint import POLICY as PI05
from walkforge.runtimes.processors import PolicyProcessor

PRE_STATS = "policy_preprocessor_step_5_normalizer_processor.safetensors"  # pi0's, as write_folder names it
LM_ONLY = frozenset({"model.paligemma_with_expert.paligemma.lm_head.weight"})
BOTH = LM_ONLY | {"model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"}


def facts(meta=None, steps=(), shapes=None, keys=frozenset()) -> FolderFacts:
    return FolderFacts(meta or {}, frozenset(steps), shapes or {}, keys)


@pytest.mark.parametrize("given, release, says", [
    (facts({"pretrained_revision": None}, keys=BOTH), "0.6", "pretrained_revision"),
    (facts(shapes={"observation.images.top.count": (1, 1, 1)}, keys=LM_ONLY), "0.6", "count stat"),
    (facts(steps={"relative_actions_processor"}, keys=LM_ONLY), "0.6", "relative_actions_processor"),
    (facts(steps={"delta_actions_processor"}, keys=LM_ONLY), "0.5", "delta_actions_processor"),
    (facts({"use_relative_actions": False}), "0.5", "relative actions"),
    (facts(keys=BOTH), "0.5", "holds embed_tokens"),
    (facts(shapes={"observation.images.top.mean": (3, 1, 1)}, keys=LM_ONLY), "0.4", "without embed_tokens"),
])
def test_the_newest_marker_decides_the_release(given, release, says):
    got = decide(given)
    assert (got.version, got.certain) == (release, True) and says in got.how


def test_a_folder_without_markers_gets_the_newest_semantics_and_says_so():
    got = decide(facts({"type": "pi0"}))
    assert (got.version, got.certain) == (NEWEST, False)
    assert "no marker" in got.how and "--lerobot-version" in got.how


def test_lerobot_version_overrides_the_markers():
    got = decide(facts({"pretrained_revision": None}), "0.4")
    assert (got.version, got.how, got.certain) == ("0.4", "--lerobot-version 0.4", True)
    assert check_version("0.5.1") == "0.5" and check_version(" 0.6 ") == "0.6"
    for bad in ("0.3", "1.0", "latest", "0.6.x"):
        with pytest.raises(WalkforgeError, match="--lerobot-version"):
            check_version(bad)


def test_pi05_prompt_state_dims_per_release():
    assert decide(facts(keys=LM_ONLY)).prompt_state_dims(6, 32) == 32  # 0.4.x: the padded state
    assert decide(facts(keys=BOTH)).prompt_state_dims(6, 32) == 6  # ≥ 0.5.0: the state's own dims


NAMES = ["shoulder", "elbow", "wrist_flex", "wrist_roll", "base", "Gripper_L"]


@pytest.mark.parametrize("exclude, names, dim, mask", [
    (["gripper"], NAMES, 6, [True] * 5 + [False]),  # substring, case-insensitive
    (["WRIST"], NAMES, 6, [True, True, False, False, True, True]),
    (["base"], NAMES[:3], 5, [True] * 5),  # dims past the names are relative
    (["gripper"], None, 4, [True] * 4),  # no names: every dim relative, the gripper too
    ([], NAMES, 6, [True] * 6), (["", None], NAMES, 6, [True] * 6),
    (["elbow"], NAMES, 3, [True, False, True]),  # names past the action dim are ignored
])
def test_relative_mask_is_lerobots_rule(exclude, names, dim, mask):
    assert relative_mask(exclude, names, dim) == mask


def steps(enabled_post: bool, pre: bool = True, exclude=("gripper",), names=NAMES):
    pre_steps = [{"registry_name": "relative_actions_processor",
                  "config": {"enabled": enabled_post, "exclude_joints": list(exclude),
                             "action_names": names}}]
    post_steps = [{"registry_name": "unnormalizer_processor"},
                  {"registry_name": "absolute_actions_processor", "config": {"enabled": enabled_post}}]
    return {f"{PRE}.json": pre_steps if pre else [], f"{POST}.json": post_steps}


def test_relative_actions_entry_from_the_steps():
    assert relative_actions(steps(False), 6, 6) is None  # saved disabled (every ≥ 0.5.1 folder)
    assert relative_actions({}, 6, 6) is None  # 0.4.x / 0.5.0: no such step
    got = relative_actions(steps(True), 6, 7)
    assert got == {"mask": [True] * 5 + [False], "exclude_joints": ["gripper"], "action_names": NAMES}
    renamed = {"relative_actions_processor": "delta_actions_processor"}
    delta = {k: [dict(st, registry_name=renamed.get(st["registry_name"], st["registry_name"])) for st in v]
             for k, v in steps(True).items()}
    assert relative_actions(delta, 6, 7) == got  # 0.5.1's name for the same step
    with pytest.raises(WalkforgeError, match="no relative_actions_processor / delta_actions_processor"):
        relative_actions(steps(True, pre=False), 6, 6)
    with pytest.raises(WalkforgeError, match="state has 4 dims and the action 6"):
        relative_actions(steps(True), 6, 4)


def processor(entry: dict) -> PolicyProcessor:
    """A processor over `entry` with the steps a 0.3 – 0.4 runtime ran for it (what `upgrade`
    writes into older bundles) and a tokenizer that spells each character as one id."""
    steps = None if entry.get("processors", {}) is None else legacy_steps(entry)  # model-only: none
    proc = PolicyProcessor(entry | {"steps": steps}, lambda rel: Path(rel).read_bytes())
    proc.__dict__["tokenizer"] = type("Chars", (), {"bos_id": 2, "encode": staticmethod(
        lambda text: [10 + ord(c) % 200 for c in text])})()
    proc.__dict__["stats"] = {}
    return proc


def pi05_entry(**extra) -> dict:
    cfg = get_recipe("pi05").variant("tiny")
    entry = default_policy(cfg, PI05) | {"state": {"key": "observation.state", "dim": 3},
                                           "tokenizer_max_length": 200} | extra
    return entry


def observation(state) -> dict:
    return {"observation.images.cam_0": np.zeros((8, 8, 3), np.uint8), "observation.state": np.array(state),
            "task": "go"}


def decoded(ids: np.ndarray) -> str:
    return "".join(chr(i - 10) for i in ids[1:] if i)


def test_pi05_writes_the_states_own_dims_since_0_5_and_all_padded_dims_before():
    state = [0.0, 1.0, -1.0]  # IDENTITY: already in [-1, 1]; bins 128, 255, 0
    padded = processor(pi05_entry()).prepare(observation(state))  # no prompt_state_dims: 0.3.x bundles
    own = processor(pi05_entry(prompt_state_dims=3)).prepare(observation(state))
    assert decoded(own.feeds["prompt_ids"][0]).endswith("State: 128 255 0;\nAction: ")
    pad_bins = " ".join(["128"] * (padded_dims := int(pi05_entry()["max_state_dim"]) - 3))
    assert decoded(padded.feeds["prompt_ids"][0]).endswith(f"State: 128 255 0 {pad_bins};\nAction: ")
    assert padded_dims > 0


def test_relative_actions_add_the_raw_state_back_on_the_masked_dims():
    cfg = get_recipe("pi0").variant("tiny")
    entry = default_policy(cfg, PI0) | {"state": {"key": "observation.state", "dim": 4},
                                          "action": {"key": "action", "dim": 3},
                                          "relative_actions": {"mask": [True, False, True]}}
    proc = processor(entry)
    chunk = np.arange(2 * 5 * cfg.action_dim, dtype=np.float32).reshape(2, 5, cfg.action_dim)
    state = np.array([[10.0, 20.0, 30.0, 40.0], [-1.0, -2.0, -3.0, -4.0]], np.float32)
    got = proc.postprocess(chunk, state)
    want = chunk[..., :3] + np.array([[[10.0, 0.0, 30.0]], [[-1.0, 0.0, -3.0]]], np.float32)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(WalkforgeError, match="relative to the state"):
        proc.postprocess(chunk)
    np.testing.assert_array_equal(processor(default_policy(cfg, PI0)).postprocess(chunk), chunk)


def test_stats_are_compared_by_value_whatever_their_shape(tmp_path: Path):
    """LeRobot 0.6 saves a camera's count as (1, 1, 1) in the preprocessor's file, (1,) in the
    postprocessor's: one value, two shapes. A different value is still refused."""
    write_folder(tmp_path, "pi0")
    pre = load_file(str(tmp_path / PRE_STATS))
    post = tmp_path / f"{POST}_step_0_unnormalizer_processor.safetensors"
    save_file(pre | {"observation.images.base.count": torch.tensor([[[7.0]]])}, str(tmp_path / PRE_STATS))
    save_file(load_file(str(post)) | {"observation.images.base.count": torch.tensor([7.0])}, str(post))
    got = get_recipe("pi0").read_checkpoint(tmp_path, {})
    assert got.manifest["policy"]["lerobot"]["release"] == "0.6"  # the (1, 1, 1) count says so
    save_file(load_file(str(post)) | {"observation.images.base.count": torch.tensor([8.0])}, str(post))
    with pytest.raises(WalkforgeError, match="stat 'observation.images.base.count' differs"):
        get_recipe("pi0").read_checkpoint(tmp_path, {})


def model_only(folder: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, to / name)
    return to


def test_a_model_only_folder_reads_without_processors_and_processors_dir_supplies_them(tmp_path: Path):
    write_folder(tmp_path / "full", "pi0")
    full = get_recipe("pi0").read_checkpoint(tmp_path / "full", {}).manifest["policy"]
    bare = model_only(tmp_path / "full", tmp_path / "bare")
    got = get_recipe("pi0").read_checkpoint(bare, {})
    assert got.manifest["policy"]["processors"] is None and got.files == {}
    assert got.manifest["policy"]["lerobot"] == full["lerobot"]  # the weights still say 0.4.x
    with pytest.raises(WalkforgeError, match=r"model-only folder .*--processors DIR"):
        processor(got.manifest["policy"]).prepare(observation([0.0] * 7))
    supplied = get_recipe("pi0").read_checkpoint(bare, {}, processors=tmp_path / "full")
    given = {"processors": {**full["processors"], "from": "--processors"}}
    assert supplied.manifest["policy"] == full | given
    with pytest.raises(WalkforgeError, match="--processors .* holds neither"):
        get_recipe("pi0").read_checkpoint(bare, {}, processors=tmp_path / "bare")


def test_embed_tokens_wins_over_a_different_lm_head(tmp_path: Path):
    """≥ 0.5 saves both; training moves embed_tokens only. The model runs on embed_tokens."""
    f = write_folder(tmp_path, "pi0")
    tensors = dict(f.tensors)
    tensors[EMBED] = tensors[LM_HEAD] + 1.0
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg, read = get_recipe("pi0").read_checkpoint(tmp_path, {})
    assert torch.equal(read[EMBED], tensors[EMBED]) and not torch.equal(read[EMBED], tensors[LM_HEAD])
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["paligemma_variant"] and cfg.llm.vocab == tensors[EMBED].shape[0]


def test_the_compile_warns_when_the_release_is_a_guess_or_the_folder_model_only():
    from walkforge.compiler.pipeline import policy_notes

    sure = {"lerobot": decide(facts(keys=BOTH)).entry(), "processors": {"files": [], "from": "folder"}}
    assert policy_notes(sure) == [] and policy_notes({}) == []
    guess = policy_notes({"lerobot": decide(facts()).entry(), "processors": None})
    assert len(guess) == 2
    assert guess[0].startswith(f"warning: LeRobot {NEWEST} semantics: the folder shows no")
    assert "--processors DIR" in guess[1]
