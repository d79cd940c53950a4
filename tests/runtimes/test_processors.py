"""runtimes/processors, one step at a time, against the formulas of docs/model_facts.md
("LeRobot policy folders and processing"), written out here independently (torch's interpolate for the resize,
transformers' tokenizer for the ids)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lerobot_folder import write_tokenizer
from tolerances import RESIZE_TOL, rel_err

from walkforge.errors import WalkforgeError
from walkforge.runtimes.processors.images import (
    camera_image,
    padded_size,
    resize_bilinear,
    resize_with_pad,
    to_chw,
    to_unit_float,
)
from walkforge.runtimes.processors.prompts import clean_task, pi0_prompt, pi05_prompt, tokenize
from walkforge.runtimes.processors.state import normalize, pad_to, state_bins, unnormalize
from walkforge.runtimes.processors.tokenizer import load_tokenizer

SIZES = [(480, 640), (97, 203), (224, 224), (300, 100), (20, 30)]  # odd, landscape, portrait, upscaled


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def torch_resize_with_pad(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference, straight from the formula: ratio = max(W_in/W, H_in/H), truncated size,
    torch bilinear (align_corners False, no antialias), floor(d/2) zeros before, the rest after."""
    x = torch.from_numpy(chw)[None]
    h_in, w_in = chw.shape[1:]
    if (h_in, w_in) != (height, width):
        ratio = max(w_in / width, h_in / height)
        nh, nw = int(h_in / ratio), int(w_in / ratio)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
        top, left = (height - nh) // 2, (width - nw) // 2
        x = F.pad(x, (left, width - nw - left, top, height - nh - top), value=0.0)
    return x[0].numpy()


# --- images ---------------------------------------------------------------------------------------

def test_uint8_is_divided_by_255_and_floats_pass_unchanged():
    img = frame(5, 7)
    assert np.array_equal(to_unit_float(img, "cam"), img.astype(np.float32) / np.float32(255))
    f = np.random.default_rng(1).random((5, 7, 3)).astype(np.float32)
    assert np.array_equal(to_unit_float(f, "cam"), f)
    assert to_unit_float(f.astype(np.float64), "cam").dtype == np.float32


@pytest.mark.parametrize(("image", "match"), [
    (np.full((4, 4, 3), 1.5, np.float32), r"cam: float images must lie in \[0, 1\]"),
    (np.full((4, 4, 3), -0.1, np.float32), r"must lie in \[0, 1\]"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN or inf"),
    (np.zeros((4, 4, 3), np.int16), "dtype int16"),
])  # fmt: skip
def test_bad_pixel_values_are_refused(image, match):
    with pytest.raises(WalkforgeError, match=match):
        to_unit_float(image, "cam")


def test_hwc_and_chw_are_told_apart_by_the_channel_axis():
    hwc = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    assert np.array_equal(to_chw(hwc, "cam"), hwc.transpose(2, 0, 1))
    chw = hwc.transpose(2, 0, 1).copy()
    assert np.array_equal(to_chw(chw, "cam"), chw)


@pytest.mark.parametrize(("shape", "match"), [
    ((3, 5, 3), "ambiguous"), ((5, 7, 4), "no axis of 3 channels"), ((1, 5, 7), "no axis of 3"),
    ((5, 7), r"want \(H, W, 3\) or \(3, H, W\)"),
])  # fmt: skip
def test_wrong_channel_layouts_are_refused(shape, match):
    with pytest.raises(WalkforgeError, match=match):
        to_chw(np.zeros(shape, np.float32), "cam")


def test_padded_size_keeps_the_aspect_ratio_truncated():
    assert padded_size(480, 640, (224, 224)) == (int(480 / (640 / 224)), int(640 / (640 / 224)))
    assert padded_size(480, 640, (224, 224)) == (168, 224)
    assert padded_size(97, 203, (224, 224)) == (int(97 / (203 / 224)), 224) == (107, 224)
    assert padded_size(300, 100, (224, 224)) == (224, 74)


@pytest.mark.parametrize(("size", "out"), [((480, 640), (168, 224)), ((97, 203), (107, 224)),
                                           ((20, 30), (149, 224)), ((7, 5), (3, 2))])
def test_bilinear_matches_torch_interpolate(size, out):
    x = np.random.default_rng(2).random((3, *size)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x)[None], size=out, mode="bilinear", align_corners=False,
                         antialias=False)[0].numpy()
    got = resize_bilinear(x, *out)
    assert got.shape == want.shape and got.dtype == np.float32
    assert rel_err(got, want) <= RESIZE_TOL


@pytest.mark.parametrize("size", SIZES)
def test_resize_with_pad_matches_the_formula(size):
    x = to_chw(to_unit_float(frame(*size, seed=3), "cam"), "cam")
    got = resize_with_pad(x, (224, 224))
    want = torch_resize_with_pad(x, 224, 224)
    assert got.shape == (3, 224, 224)
    assert rel_err(got, want) <= RESIZE_TOL


def test_padding_is_black_and_centred_floor_before():
    got = resize_with_pad(np.ones((3, 97, 203), np.float32), (224, 224))  # → 107 rows, 117 to pad
    top = (224 - 107) // 2  # 58 before, 59 after
    assert (got[:, :top] == 0).all() and (got[:, top + 107:] == 0).all()
    assert np.allclose(got[:, top:top + 107], 1.0) and 224 - 107 - top == 59


def test_same_size_is_not_resampled():
    x = np.random.default_rng(4).random((3, 224, 224)).astype(np.float32)
    assert np.array_equal(resize_with_pad(x, (224, 224)), x)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_camera_image_whole_step(layout, kind):
    img = frame(97, 203, seed=5)
    unit = img.astype(np.float32) / 255
    given = img if kind == "uint8" else unit
    given = given if layout == "hwc" else given.transpose(2, 0, 1)
    got = camera_image(given, (224, 224), "cam")
    assert rel_err(got, torch_resize_with_pad(unit.transpose(2, 0, 1).copy(), 224, 224)) <= RESIZE_TOL


# --- state and actions ------------------------------------------------------------------------------

STATS = {"s.mean": np.array([0.5, -1.0, 2.0], np.float32), "s.std": np.array([2.0, 0.5, 1.0], np.float32),
         "s.min": np.array([-3.0, -2.0, 1.0], np.float32), "s.max": np.array([3.0, 0.0, 1.0], np.float32),
         "s.q01": np.array([-2.0, -1.5, 0.0], np.float32), "s.q99": np.array([2.0, 0.5, 4.0], np.float32)}
X = np.array([[0.25, -0.75, 3.0], [10.0, -5.0, 1.0]], np.float32)


def formula(mode: str, x: np.ndarray) -> np.ndarray:
    s = {k.split(".")[1]: v.astype(np.float64) for k, v in STATS.items()}
    x = x.astype(np.float64)
    if mode == "MEAN_STD":
        return (x - s["mean"]) / (s["std"] + 1e-8)
    low, high = (s["min"], s["max"]) if mode == "MIN_MAX" else (s["q01"], s["q99"])
    span = np.where(high - low == 0, 1e-8, high - low)
    return 2 * (x - low) / span - 1


@pytest.mark.parametrize("mode", ["MEAN_STD", "MIN_MAX", "QUANTILES"])
def test_normalize_and_its_inverse_follow_the_formulas(mode):
    x = X if mode != "MIN_MAX" else X[:, :2]  # the zero-range dim on its own below
    stats = STATS if mode != "MIN_MAX" else {k: v[:2] for k, v in STATS.items()}
    got = normalize(x, mode, stats, "s")
    assert got.dtype == np.float32 and rel_err(got, formula(mode, X)[:, :x.shape[1]]) <= 4 * 2.0**-23
    assert rel_err(unnormalize(got, mode, stats, "s"), x) <= 4 * 2.0**-23
    assert (got.max() > 1) if mode != "MEAN_STD" else True  # no clipping


def test_min_max_zero_range_uses_eps_and_identity_is_identity():
    got = normalize(X, "MIN_MAX", STATS, "s")[:, 2]  # min = max = 1: span 1e-8
    assert np.allclose(got, 2 * (X[:, 2] - 1.0) / np.float32(1e-8) - 1)
    assert np.array_equal(normalize(X, "IDENTITY", {}, "s"), X)
    assert np.array_equal(unnormalize(X, "IDENTITY", {}, "s"), X)


def test_missing_stats_are_named():
    with pytest.raises(WalkforgeError, match="normalised with QUANTILES but the bundle's stats lack s.q99"):
        normalize(X, "QUANTILES", {"s.q01": STATS["s.q01"]}, "s")


def test_zero_padding_after_normalising():
    got = pad_to(normalize(X, "MEAN_STD", STATS, "s"), 8)
    assert got.shape == (2, 8) and (got[:, 3:] == 0).all()
    with pytest.raises(WalkforgeError, match="longer than the compiled 2"):
        pad_to(X, 2)


def test_state_bins_formula():
    s = np.array([0.0, -1.0, 1.0, -1.5, 2.0, 0.5, -0.0078125, 0.99, -0.3], np.float32)
    edges = [-1 + 2 * i / 256 for i in range(256)]
    want = [sum(e <= v for e in edges) - 1 for v in s.astype(np.float64)]  # digitize, by hand
    assert state_bins(s).tolist() == want
    assert want[:5] == [128, 0, 255, -1, 255]


# --- prompts and tokens -----------------------------------------------------------------------------

def test_pi0_prompt_ends_in_one_newline():
    assert pi0_prompt("pick up the cup") == "pick up the cup\n"
    assert pi0_prompt("pick up the cup\n") == "pick up the cup\n"


def test_pi05_prompt_format():
    assert clean_task("  open_the drawer\nnow \n") == "open the drawer now"
    got = pi05_prompt(" open_the\ndrawer ", state_bins(np.array([0.0, -1.0, 1.0, 0.0], np.float32)))
    assert got == "Task: open the drawer, State: 128 0 255 128;\nAction: "


def test_tokenize_adds_bos_pads_right_and_truncates_too_long_as_lerobot(caplog):
    encode = {"ab": [5, 6], "abc": [5, 6, 7, 8]}.__getitem__
    ids, mask = tokenize(["ab", "abc"], encode, 2, 6)
    assert ids.tolist() == [[2, 5, 6, 0, 0, 0], [2, 5, 6, 7, 8, 0]] and ids.dtype == np.int64
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    # LeRobot's tokenizer step (truncation=True, BOS kept): the first max_length tokens, a warning
    ids, mask = tokenize(["abc", "ab"], encode, 2, 4)
    assert ids.tolist() == [[2, 5, 6, 7], [2, 5, 6, 0]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert "task too long: its prompt is 5 tokens (with BOS), cut to 4" in caplog.text


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), fast=True)


TEXTS = ["pick up the red block\n", "Task: fold the towel, State: 128 0 255;\nAction: ", "zebra ü 42\n"]


@pytest.mark.parametrize("file", ["tokenizer.model", "tokenizer.json"])
def test_bundled_tokenizer_gives_transformers_ids(tokenizer_dir, file):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert type(ref).__name__ in ("GemmaTokenizerFast", "GemmaTokenizer")
    tok = load_tokenizer(lambda rel: (tokenizer_dir / rel).read_bytes(), ".", [file])
    assert tok.bos_id == ref.bos_token_id == 2
    for text in TEXTS:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert len(tok.encode(TEXTS[1])) > 10  # a real segmentation, not an empty list


def test_tokenizer_folder_without_files_is_refused(tmp_path):
    with pytest.raises(WalkforgeError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(lambda rel: (tmp_path / rel).read_bytes(), ".", ["tokenizer_config.json"])
