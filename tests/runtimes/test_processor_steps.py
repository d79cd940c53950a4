"""Each processing step (runtimes/processors/steps.py) on its own, and the step lists the compiler
builds from LeRobot's processor JSONs (recipes/lerobot.py `policy_steps`)."""

from __future__ import annotations

import numpy as np
import pytest

from walkforge.errors import WalkforgeError
from walkforge.recipes.lerobot import PROCESSORS, PolicyKind, default_policy, policy_steps
from walkforge.runtimes.processors import steps
from walkforge.runtimes.processors.steps import Sample
from walkforge.runtimes.processors.tokenizer import TextTokenizer


class Ctx:
    """A step context: stats and a tokenizer that maps each character to its code point."""

    def __init__(self, stats: dict | None = None, bos: int | None = 2) -> None:
        self.stats = stats or {}
        self.tokenizer = TextTokenizer(lambda text: [ord(c) for c in text], bos, "chars")


def sample(state=((1.0, 2.0),), prompts=("pick",), batched=False, observation=None) -> Sample:
    return Sample(observation or {}, batched, np.asarray(state, dtype=np.float32), tuple(prompts))


def test_newline_adds_one_only_when_missing():
    out = steps.newline(sample(prompts=("a", "b\n")), {}, Ctx())
    assert out.prompts == ("a\n", "b\n")


def test_normalize_then_pad_state_feeds_the_padded_state():
    ctx = Ctx({"s.mean": np.array([1.0, 1.0]), "s.std": np.array([2.0, 4.0])})
    out = steps.normalize_state(sample(), {"key": "s", "mode": "MEAN_STD"}, ctx)
    out = steps.pad_state(out, {"dim": 4}, ctx)
    np.testing.assert_allclose(out.feeds["state"], [[0.0, 0.25, 0.0, 0.0]], rtol=1e-6)
    assert out.state.shape == (1, 4)


def test_state_to_prompt_writes_bins_of_the_first_dims():
    out = steps.state_to_prompt(sample(state=((0.0, -1.0, 0.99),), prompts=("open_door",)), {"dims": 2},
                                Ctx())
    assert out.prompts == ("Task: open door, State: 128 0;\nAction: ",)


def test_tokenize_bos_and_padding_modes():
    s = sample(state=((0.0,), (0.0,)), prompts=("ab", "abcd"))
    full = steps.tokenize_prompts(s, {"max_length": 8, "padding": "max_length", "bos": True}, Ctx())
    assert full.feeds["prompt_ids"].tolist() == [[2, 97, 98, 0, 0, 0, 0, 0], [2, 97, 98, 99, 100, 0, 0, 0]]
    longest = steps.tokenize_prompts(s, {"max_length": 8, "padding": "longest", "bos": False}, Ctx())
    assert longest.feeds["prompt_ids"].tolist() == [[97, 98, 0, 0], [97, 98, 99, 100]]
    assert longest.feeds["prompt_mask"].sum(1).tolist() == [2, 4]
    cut = steps.tokenize_prompts(s, {"max_length": 3, "padding": "longest", "bos": False}, Ctx())
    assert cut.feeds["prompt_ids"].tolist() == [[97, 98, 0], [97, 98, 99]]


def test_tokenize_asks_for_a_bos_the_tokenizer_lacks():
    with pytest.raises(WalkforgeError, match="no BOS"):
        steps.tokenize_prompts(sample(), {"max_length": 4, "bos": True}, Ctx(bos=None))


@pytest.mark.parametrize(("pad", "rows", "cols"), [("center", (1, 3), (0, 4)), ("left_top", (2, 4), (0, 4))])
def test_cameras_pad_where_the_step_says(pad, rows, cols):
    frame = np.full((2, 4, 3), 255, dtype=np.uint8)  # 2×4 → 4×4 target: 2 rows of padding
    out = steps.cameras(sample(observation={"cam": frame, "gone": frame}),
                        {"keys": ["cam", "off", "gone"], "empty": ["gone"], "resolution": [4, 4], "pad": pad},
                        Ctx())
    image = out.feeds["images"][0, 0, 0]
    assert np.flatnonzero(image.any(1)).tolist() == list(range(*rows))
    assert out.feeds["image_masks"].tolist() == [[True, False, False]]  # absent and empty: masked


def test_cameras_refuse_an_observation_without_any():
    with pytest.raises(WalkforgeError, match="none of this policy's cameras"):
        steps.cameras(sample(), {"keys": ["cam"], "resolution": [4, 4]}, Ctx())


def test_post_steps_crop_unnormalize_and_add_the_state_back():
    ctx = Ctx({"a.min": np.array([0.0, 0.0]), "a.max": np.array([2.0, 4.0])})
    chunk = np.zeros((1, 3, 5), dtype=np.float32)  # model space: 0 is the middle of the range
    state = np.array([[10.0, 20.0]], dtype=np.float32)
    post = [{"name": "crop_actions", "dim": 2}, {"name": "unnormalize", "key": "a", "mode": "MIN_MAX"},
            {"name": "absolute_actions", "mask": [True, False]}]
    out = steps.run_post(post, chunk, state, ctx)
    np.testing.assert_allclose(out, np.broadcast_to([11.0, 2.0], (1, 3, 2)), rtol=1e-6)


def test_an_unknown_step_is_refused_by_name():
    with pytest.raises(WalkforgeError, match="'resample'"):
        steps.run_pre([{"name": "resample"}], sample(), Ctx())


# -- the lists the compiler builds -------------------------------------------------------------

KIND = PolicyKind(type="x", normalization={"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}, preprocessor=(),
                  bos=False, image_pad="left_top", prompt_padding="longest")


def entry(**extra):
    return {"cameras": [{"key": "cam", "empty": False}], "image_resolution": [8, 8],
            "normalization": {"STATE": "MEAN_STD", "ACTION": "QUANTILES"}, "max_state_dim": 6,
            "state": {"key": "observation.state", "dim": 3}, "action": {"key": "action", "dim": 2},
            "tokenizer_max_length": 12, **extra}


def lerobot(*pre, post=("unnormalizer_processor", "device_processor")):
    return {PROCESSORS[0]: [{"registry_name": n, "config": c} for n, c in pre],
            PROCESSORS[1]: [{"registry_name": n} for n in post]}


def test_steps_follow_the_processor_files_order_with_the_model_side_added():
    found = lerobot(("rename_observations_processor", {"rename_map": {}}), ("to_batch_processor", {}),
                    ("smolvla_new_line_processor", {}), ("tokenizer_processor", {"padding": "longest"}),
                    ("device_processor", {}), ("normalizer_processor", {}))
    built = policy_steps(found, entry(), KIND, 3)
    assert [s["name"] for s in built["pre"]] == ["cameras", "newline", "tokenize", "normalize", "pad_state"]
    assert built["pre"][0]["pad"] == "left_top" and built["pre"][2] == {
        "name": "tokenize", "max_length": 12, "padding": "longest", "bos": False}
    assert built["post"] == [{"name": "crop_actions", "dim": 2},
                             {"name": "unnormalize", "key": "action", "mode": "QUANTILES"}]


def test_state_prompt_gets_the_padded_state_and_relative_actions_their_mask():
    found = lerobot(("normalizer_processor", {}), ("pi05_prepare_state_tokenizer_processor_step", {}),
                    ("tokenizer_processor", {}),
                    post=("unnormalizer_processor", "absolute_actions_processor"))
    built = policy_steps(found, entry(relative_actions={"mask": [True, False]}), KIND, 3)
    assert [s["name"] for s in built["pre"]] == ["cameras", "normalize", "pad_state", "state_to_prompt",
                                                  "tokenize"]
    assert built["pre"][3] == {"name": "state_to_prompt", "dims": 3}
    assert built["post"][-1] == {"name": "absolute_actions", "mask": [True, False]}


def test_a_step_walkforge_cannot_run_fails_the_compile_and_no_files_mean_no_steps():
    with pytest.raises(WalkforgeError, match="'crop_images_processor'"):
        policy_steps(lerobot(("crop_images_processor", {})), entry(), KIND, 3)
    assert policy_steps({}, entry(), KIND, 3) is None


def test_a_variant_compile_gets_its_kinds_default_steps():
    from walkforge.recipes.pi05.checkpoint import POLICY
    from walkforge.recipes.pi05.config import VARIANTS

    built = default_policy(VARIANTS["tiny"], POLICY)["steps"]
    assert [s["name"] for s in built["pre"]] == ["cameras", "normalize", "pad_state", "state_to_prompt",
                                                  "tokenize"]
    assert built["pre"][1]["mode"] == "IDENTITY"
