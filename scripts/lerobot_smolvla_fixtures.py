#!/usr/bin/env python
"""Reference fixtures for walkforge's `smolvla` recipe, written and computed by LeRobot's OWN SmolVLA.

Runs in the LeRobot 0.6.1 venv (scripts/lerobot_venv.sh 0.6.1, plus `pip install
"num2words>=0.5.14,<0.6"`: lerobot[smolvla]'s one extra requirement, which transformers'
SmolVLMProcessor refuses to be built without) and writes, under OUT (tests/fixtures/lerobot):

  smolvlm2-tiny/            an offline SmolVLM2-like folder: config.json (SmolVLMConfig with tiny
                            vision / text configs = walkforge's smolvla `tiny`), processor_config.json
                            (SmolVLMProcessor: image + video processor, image_seq_len 16) and a tiny
                            byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json, SmolVLM2's
                            special tokens, pad <|im_end|>, no BOS added). SmolVLA's `vlm_model_name`
                            names it; walkforge gets it as `--tokenizer`.
  v<version>/smolvla/folder/          what LeRobot's save_pretrained wrote (policy + both pipelines)
  v<version>/smolvla/reference.npz    raw observations, noise given, LeRobot's outputs, its batch
  v<version>/smolvla/reference.json   versions, sizes, observations, what each key of the npz holds

Nothing is patched: LeRobot builds the VLM from smolvlm2-tiny/config.json (load_vlm_weights False),
keeps its first `num_vlm_layers` text layers and derives the expert; the weights are then reseeded
(`perturb`, as for pi0). SmolVLA has no relative actions in LeRobot 0.6.1 (SmolVLAConfig has no
use_relative_actions, its processor no relative step), so there is no smolvla_relative case.

    /work/venvs/lerobot-0.6.1/bin/python scripts/lerobot_smolvla_fixtures.py [--make-vlm]
    /work/venvs/lerobot-0.6.1/bin/python scripts/lerobot_smolvla_fixtures.py --check

`--make-vlm` rewrites smolvlm2-tiny/ (otherwise it is written only when missing: the policy's
tokenizer and shapes come from it). `--check` reloads the folder with LeRobot's from_pretrained
(policy and both pipelines) and confirms it reproduces reference.npz exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lerobot_fixtures import chdir, lerobot_version, perturb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLM_DIR = "smolvlm2-tiny"

# walkforge's smolvla `tiny` (walkforge/recipes/smolvla/config.py VARIANTS["tiny"]); the expert is
# LeRobot's derivation (width 64·0.75 = 48, MLP get_intermediate_size(48) = 256, heads as the VLM).
TINY = {
    "vision": {"width": 32, "layers": 2, "heads": 2, "mlp": 64, "patch": 4, "image": 32},
    "llm": {"width": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "mlp": 128},
    "scale_factor": 2,
}
TEXT_LAYERS = 4  # in the VLM's config.json; SmolVLA keeps the first num_vlm_layers = 2 (the cut shows)
VOCAB = 320  # the tokenizer's size (special tokens included) = text_config.vocab_size ≤ tiny's 1000
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
           "<global-img>", "<end_of_utterance>")  # SmolVLM2's, ids 0..6 here
CORPUS = ("pick up the red block and put it in the box\n", "open the top drawer\n",
          "close the door slowly\n", "move the arm to the left\n", "stack the green cups\n",
          "fold the towel and put it in the box\n")

CAMERAS = {"base": (48, 64), "wrist": (40, 30)}  # HW: base padded on top, wrist on the left (to 32²)
STATE_DIM = ACTION_DIM = 6
CHUNK, N_ACTION_STEPS, STEPS = 10, 5, 10
PROMPT_LEN = 16  # tokenizer_max_length = tiny's max_prompt_len
SEED = 40
SHORT = {"a": "pick up the red block", "b": "open the top drawer",
         "d": ("close the door", "stack the green cups and put them in the box")}
LONG = ("pick up the red block and put it in the box, then open the top drawer and close the door "
        "slowly, move the arm to the left and stack the green cups")


# --- the offline VLM folder ----------------------------------------------------------------------

def make_vlm(folder: Path) -> Path:
    """config.json, processor_config.json, tokenizer.json, tokenizer_config.json (module doc)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds nothing: no BOS, as SmolVLM2
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(SPECIAL), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=8192,
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                              "global_image_token": "<global-img>",
                              "end_of_utterance_token": "<end_of_utterance>"})
    assert len(fast) == VOCAB, len(fast)
    side = {"longest_edge": TINY["vision"]["image"]}
    SmolVLMProcessor(image_processor=SmolVLMImageProcessor(size=side, max_image_size=side,
                                                           do_image_splitting=False),
                     tokenizer=fast,
                     video_processor=SmolVLMVideoProcessor(size=side, max_image_size=side),
                     image_seq_len=image_tokens()).save_pretrained(folder)
    vis, llm = TINY["vision"], TINY["llm"]
    SmolVLMConfig(
        vision_config={"hidden_size": vis["width"], "intermediate_size": vis["mlp"],
                       "num_hidden_layers": vis["layers"], "num_attention_heads": vis["heads"],
                       "patch_size": vis["patch"], "image_size": vis["image"], "layer_norm_eps": 1e-6},
        text_config={"model_type": "llama", "hidden_size": llm["width"], "intermediate_size": llm["mlp"],
                     "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": llm["heads"],
                     "num_key_value_heads": llm["kv_heads"], "head_dim": llm["head_dim"],
                     "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "pad_token_id": fast.pad_token_id,
                     "bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0},
        scale_factor=TINY["scale_factor"], image_token_id=fast.convert_tokens_to_ids("<image>"),
        pad_token_id=fast.pad_token_id,
    ).save_pretrained(folder)
    return folder


def image_tokens() -> int:
    vis = TINY["vision"]
    return (vis["image"] // vis["patch"]) ** 2 // TINY["scale_factor"] ** 2


# --- inputs ---------------------------------------------------------------------------------------

def stats(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Dataset statistics as a LeRobot dataset holds them (images (3,1,1), count (1,))."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, dim in (("observation.state", STATE_DIM), ("action", ACTION_DIM)):
        mean = rng.normal(0, 1, dim).astype(np.float32)
        std = (0.5 + rng.random(dim)).astype(np.float32)
        out[key] = {"mean": mean, "std": std, "min": mean - 3 * std, "max": mean + 3 * std,
                    "q01": mean - 2 * std, "q99": mean + 2.1 * std, "count": np.array([1000], np.int64)}
    for cam in CAMERAS:
        m = rng.uniform(0.3, 0.6, (3, 1, 1)).astype(np.float32)
        out[f"observation.images.{cam}"] = {
            "mean": m, "std": np.full((3, 1, 1), 0.25, np.float32), "min": np.zeros((3, 1, 1), np.float32),
            "max": np.ones((3, 1, 1), np.float32), "count": np.array([1000], np.int64)}
    return {k: {s: v.astype(np.float32) if s != "count" else v for s, v in d.items()} for k, d in out.items()}


def observations(seed: int, st: dict) -> dict[str, dict]:
    """(a) both cameras, short task; (b) `base` missing (SmolVLA drops it), one state dim 2.6σ
    above the mean; (c) a task longer than tokenizer_max_length; (d) a batch of 2, tasks of different
    lengths (padded to the longer). States in robot units; images uint8 HWC (batched: BHWC)."""
    rng = np.random.default_rng(seed)
    mean, std = st["observation.state"]["mean"], st["observation.state"]["std"]

    def image(hw):
        yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
        base = (rng.uniform(0, 255) + rng.uniform(-3, 3) * yy + rng.uniform(-2, 2) * xx)[..., None]
        return np.clip(base + rng.normal(0, 25, (*hw, 3)), 0, 255).astype(np.uint8)

    def state():
        return (mean + std * rng.uniform(-1.5, 1.5, STATE_DIM)).astype(np.float32)

    obs = {}
    for name in ("a", "b", "c"):
        s = state()
        cams = {c: image(hw) for c, hw in CAMERAS.items()}
        omits = []
        if name == "b":
            s[2] = mean[2] + 2.6 * std[2]
            omits = ["observation.images.base"]
            cams.pop("base")
        obs[name] = {"task": LONG if name == "c" else SHORT[name], "state": s, "images": cams,
                     "omits": omits, "batch": None}
    obs["d"] = {"task": list(SHORT["d"]), "state": np.stack([state(), state()]),
                "images": {c: np.stack([image(hw), image(hw)]) for c, hw in CAMERAS.items()},
                "omits": [], "batch": 2}
    return obs


def lerobot_batch(o: dict, state: np.ndarray | None = None) -> dict:
    """LeRobot's own inference input: prepare_observation_for_inference per sample (uint8 HWC →
    float CHW in [0, 1], a batch dim), samples concatenated for a batch, the task (or list)."""
    from lerobot.policies.utils import prepare_observation_for_inference

    state = o["state"] if state is None else state
    if o["batch"] is None:
        raw = {f"observation.images.{c}": img.copy() for c, img in o["images"].items()}
        raw["observation.state"] = state.copy()
        return prepare_observation_for_inference(raw, torch.device("cpu"), o["task"], "")
    parts = []
    for i in range(o["batch"]):
        raw = {f"observation.images.{c}": img[i].copy() for c, img in o["images"].items()}
        raw["observation.state"] = state[i].copy()
        parts.append(prepare_observation_for_inference(raw, torch.device("cpu"), None, ""))
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if isinstance(parts[0][k], torch.Tensor)}
    return batch | {"task": list(o["task"]), "robot_type": ""}


# --- LeRobot --------------------------------------------------------------------------------------

def make_config(vlm_rel: str):
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    inputs = {f"observation.images.{c}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, *hw))
              for c, hw in CAMERAS.items()}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    side = TINY["vision"]["image"]
    return SmolVLAConfig(
        input_features=inputs,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        chunk_size=CHUNK, n_action_steps=N_ACTION_STEPS, num_steps=STEPS,
        tokenizer_max_length=PROMPT_LEN, max_state_dim=32, max_action_dim=32,
        resize_imgs_with_padding=(side, side), vlm_model_name=vlm_rel, load_vlm_weights=False,
        num_vlm_layers=TINY["llm"]["layers"], device="cpu",
        normalization_mapping={"VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode.MEAN_STD,
                               "ACTION": NormalizationMode.MEAN_STD},
    )


class Recorder:
    """Hooks on the policy: no noise may be drawn (every inference is given its noise), and the
    images prepare_images hands the model (resized with padding, in [-1, 1]) are kept."""

    def __init__(self, policy):
        self.images = None
        orig = policy.prepare_images

        def sample_noise(shape, device):
            raise AssertionError(f"LeRobot drew noise {shape}: every inference must be given its noise")

        def prepare_images(batch):
            images, masks = orig(batch)
            self.images = ([i.detach().clone() for i in images], [m.detach().clone() for m in masks])
            return images, masks

        policy.model.sample_noise = sample_noise
        policy.prepare_images = prepare_images


def image_summary(images, masks, prefix: str, out: dict, full: bool) -> None:
    """Per image slot as fed to the vision tower (B, 3, 32, 32): mask, per-channel row and column
    means, the top-left pixel (padding when padded), the min; `full`: the whole slot too."""
    for k, (img, m) in enumerate(zip(images, masks, strict=True)):
        x = img.float()
        out[f"{prefix}.slot{k}.mask"] = m.numpy().astype(np.bool_)
        out[f"{prefix}.slot{k}.rowmean"] = x.mean(dim=3).numpy()
        out[f"{prefix}.slot{k}.colmean"] = x.mean(dim=2).numpy()
        out[f"{prefix}.slot{k}.corner"] = x[:, :, 0, 0].numpy()
        out[f"{prefix}.slot{k}.min"] = x.amin(dim=(1, 2, 3)).numpy()
        if full:
            out[f"{prefix}.slot{k}.pixels"] = x.numpy()


def unbatched(x: torch.Tensor, o: dict) -> np.ndarray:
    """An output as the npz holds it: the batch dim dropped for unbatched observations."""
    x = x.numpy()
    return x[0] if o["batch"] is None else x


def run_case(case_dir: Path, vlm: Path, seed: int) -> dict:
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    folder = case_dir / "folder"
    if case_dir.exists():
        shutil.rmtree(case_dir)
    folder.mkdir(parents=True)
    vlm_rel = os.path.relpath(vlm, folder)
    st = stats(seed + 1)
    dataset_stats = {k: {s: torch.from_numpy(np.asarray(v)) for s, v in d.items()} for k, d in st.items()}
    with chdir(folder), contextlib.redirect_stdout(sys.stderr):
        cfg = make_config(vlm_rel)
        torch.manual_seed(seed)
        policy = SmolVLAPolicy(cfg)
        perturb(policy, seed)
        policy.eval()
        pre, post = make_pre_post_processors(cfg, dataset_stats=dataset_stats)
        policy.save_pretrained(folder)
        pre.save_pretrained(folder)
        post.save_pretrained(folder)
    assert all(p.dtype == torch.float32 for p in policy.parameters())

    rec = Recorder(policy)
    obs = observations(seed + 2, st)
    out: dict[str, np.ndarray] = {}
    meta_obs = {}
    gen = torch.Generator().manual_seed(seed + 3)
    tokenizer_step = next(s for s in pre.steps if hasattr(s, "input_tokenizer"))
    with chdir(folder):
        for name, o in obs.items():
            for c, img in o["images"].items():
                out[f"{name}.image.{c}"] = img
            out[f"{name}.state"] = o["state"]
            noise = torch.randn((o["batch"] or 1, CHUNK, 32), generator=gen)
            out[f"{name}.noise"] = noise.numpy()
            batch = pre(lerobot_batch(o))
            chunk_model = policy.predict_action_chunk(batch, noise=noise.clone())
            chunk = post(chunk_model)
            out[f"{name}.chunk"] = unbatched(chunk, o).astype(np.float32)
            out[f"{name}.chunk_model"] = unbatched(chunk_model, o).astype(np.float32)
            out[f"{name}.pre.state"] = unbatched(batch["observation.state"], o)
            out[f"{name}.pre.tokens"] = unbatched(batch[OBS_LANGUAGE_TOKENS], o).astype(np.int64)
            mask = unbatched(batch[OBS_LANGUAGE_ATTENTION_MASK], o)
            out[f"{name}.pre.attention_mask"] = mask.astype(np.bool_)
            image_summary(*rec.images, f"{name}.pre.image", out, full=name == "a")
            texts = batch["task"] if isinstance(batch["task"], list) else [batch["task"]]
            full = [len(tokenizer_step.input_tokenizer(t)["input_ids"]) for t in texts]
            present = [k for k in policy.config.image_features if k in batch]
            meta_obs[name] = {
                "task": o["task"], "omits": o["omits"], "batch": o["batch"],
                "cameras_fed": sorted(o["images"]),
                "image_hwc": {c: list(img.shape[-3:]) for c, img in o["images"].items()},
                "tokenized_text": texts if o["batch"] else texts[0],
                "prompt_tokens_before_truncation": full if o["batch"] else full[0],
                "padded_to": int(batch[OBS_LANGUAGE_TOKENS].shape[1]),
                "truncated": any(n > cfg.tokenizer_max_length for n in full),
                "image_slots": [{"feature": k, "mask": True} for k in present],
            }

        # select_action: n_action_steps + 1 calls on observation a, the state drifting each call;
        # each inference (queue empty) is given its noise.
        o = obs["a"]
        policy.reset()
        calls = N_ACTION_STEPS + 1
        inferences = math.ceil(calls / N_ACTION_STEPS)
        noises = [torch.randn((1, CHUNK, 32), generator=gen) for _ in range(inferences)]
        given = iter(noises)
        states, acts, acts_model = [], [], []
        for t in range(calls):
            state = (o["state"] + 0.05 * t * st["observation.state"]["std"]).astype(np.float32)
            batch = pre(lerobot_batch(o, state))
            noise = next(given).clone() if len(policy._queues["action"]) == 0 else None
            a_model = policy.select_action(batch, noise=noise)
            states.append(state)
            acts_model.append(a_model[0].numpy())
            acts.append(post(a_model)[0].numpy())
        assert next(given, None) is None
        out["select.state"] = np.stack(states).astype(np.float32)
        out["select.noise"] = torch.stack(noises).numpy()
        out["select.action"] = np.stack(acts).astype(np.float32)
        out["select.action_model"] = np.stack(acts_model).astype(np.float32)

    np.savez_compressed(case_dir / "reference.npz", **out)
    cfg_json = json.loads((folder / "config.json").read_text())
    vlm_json = json.loads((vlm / "config.json").read_text())
    meta = {
        "lerobot": lerobot_version(), "case": "smolvla", "policy_type": "smolvla",
        "versions": {"lerobot": lerobot_version(), "torch": torch.__version__,
                     "transformers": importlib.metadata.version("transformers"),
                     "tokenizers": importlib.metadata.version("tokenizers"),
                     "num2words": importlib.metadata.version("num2words"),
                     "numpy": np.__version__, "python": platform.python_version()},
        "generator": "scripts/lerobot_smolvla_fixtures.py (venv: scripts/lerobot_venv.sh 0.6.1 + num2words)",
        "seed": seed,
        "tiny": TINY | {"text_layers_in_vlm_config": TEXT_LAYERS, "vocab": VOCAB,
                        "expert": {"width": int(TINY["llm"]["width"] * cfg.expert_width_multiplier),
                                   "mlp": policy.model.vlm_with_expert.lm_expert.config.intermediate_size,
                                   "layers": TINY["llm"]["layers"]},
                        "image_tokens_per_camera": image_tokens()},
        "walkforge_config": {},  # nothing: sizes and head counts come from smolvlm2-tiny/config.json
        "sizes": {"chunk_size": CHUNK, "n_action_steps": N_ACTION_STEPS, "num_steps": STEPS,
                  "tokenizer_max_length": PROMPT_LEN, "max_state_dim": 32, "max_action_dim": 32,
                  "state_dim": STATE_DIM, "action_dim": ACTION_DIM,
                  "resize_imgs_with_padding": cfg_json["resize_imgs_with_padding"],
                  "camera_image_hw": {c: list(hw) for c, hw in CAMERAS.items()}},
        "cameras": [f"observation.images.{c}" for c in CAMERAS],
        "empty_cameras": cfg.empty_cameras,
        "normalization": cfg_json.get("normalization_mapping"),
        "relative_actions": None,
        "vlm": {"folder": f"tests/fixtures/lerobot/{VLM_DIR}", "vlm_model_name_in_config": vlm_rel,
                "scale_factor": vlm_json["scale_factor"],
                "note": "vlm_model_name (config.json) and tokenizer_name (policy_preprocessor.json) are "
                        "relative to folder/: load with folder/ as cwd"},
        "saved_keys": saved_keys(folder),
        "folder_files": sorted(p.name for p in folder.iterdir()),
        "observations": meta_obs,
        "select_action": {"calls": calls, "observation": "a, with state a + 0.05*t*std(state) at call t",
                          "inferences": len(noises)},
        "npz": {
            "<o>.image.<camera>": "uint8 HWC image fed (o in a, b, c; d: BHWC, B = 2); an omitted camera "
                                  "has no key",
            "<o>.state": "float32 (6,) robot units fed (d: (2, 6))",
            "<o>.noise": "float32 (B, chunk_size, max_action_dim) noise given to predict_action_chunk "
                         "(B = 1 for a, b, c)",
            "<o>.chunk": "float32 (chunk_size, 6) (d: (2, chunk_size, 6)): predict_action_chunk then the "
                         "postprocessor (robot units)",
            "<o>.chunk_model": "as <o>.chunk, predict_action_chunk alone (model space)",
            "<o>.pre.state": "preprocessed observation.state (normalised, not padded)",
            "<o>.pre.tokens / .pre.attention_mask": "the tokenizer step's output (padded to the longest "
                                                    "task of the batch, right, pad id 2; d: (2, L))",
            "<o>.pre.image.slot<k>.*": "image slot k as fed to the vision tower (B, 3, 32, 32), present "
                                        "cameras in config order (missing ones are dropped): mask (B,), "
                                        "rowmean/colmean (B, 3, 32), corner [:, :, 0, 0], min (B,); "
                                        "a: also pixels (the whole slot)",
            "select.state": "(calls, 6) state fed at each select_action call (images/task of a)",
            "select.noise": "(inferences, 1, chunk_size, 32) noise given per inference, in order",
            "select.action": "(calls, 6) select_action then the postprocessor",
            "select.action_model": "(calls, 6) select_action (model space)",
        },
    }
    (case_dir / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def saved_keys(folder: Path) -> dict:
    """How many tensors model.safetensors holds and which text layers / lm_head are among them."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    text = "model.vlm_with_expert.vlm.model.text_model.layers."
    return {"count": len(keys),
            "text_layers": sorted({int(k[len(text):].split(".")[0]) for k in keys if k.startswith(text)}),
            "lm_head": "model.vlm_with_expert.vlm.lm_head.weight" in keys,
            "expert_embed_tokens": any(k.startswith("model.vlm_with_expert.lm_expert.embed_tokens")
                                       for k in keys)}


def check_case(case_dir: Path) -> float:
    """Reload the folder with LeRobot's from_pretrained and recompute everything in reference.npz."""
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    folder = case_dir / "folder"
    ref = dict(np.load(case_dir / "reference.npz"))
    meta = json.loads((case_dir / "reference.json").read_text())
    worst = 0.0
    with chdir(folder), contextlib.redirect_stdout(sys.stderr):
        policy = SmolVLAPolicy.from_pretrained(str(folder))
        policy.eval()
        pre, post = make_pre_post_processors(policy.config, pretrained_path=str(folder))
        Recorder(policy)

        def fed(name, state=None):
            om = meta["observations"][name]
            o = {"task": om["task"], "batch": om["batch"], "state": ref[f"{name}.state"],
                 "images": {c: ref[f"{name}.image.{c}"] for c in om["cameras_fed"]}}
            return pre(lerobot_batch(o, state))

        for name in meta["observations"]:
            batched = meta["observations"][name]["batch"] is not None
            cm = policy.predict_action_chunk(fed(name), noise=torch.from_numpy(ref[f"{name}.noise"]))
            c = post(cm)
            for key, got in ((f"{name}.chunk", c), (f"{name}.chunk_model", cm)):
                got = got.numpy() if batched else got[0].numpy()
                worst = max(worst, float(np.abs(got - ref[key]).max()))
        policy.reset()
        noises = iter(torch.from_numpy(n) for n in ref["select.noise"])
        for t, state in enumerate(ref["select.state"]):
            noise = next(noises) if len(policy._queues["action"]) == 0 else None
            am = policy.select_action(fed("a", state), noise=noise)
            a = post(am)
            worst = max(worst, float(np.abs(a[0].numpy() - ref["select.action"][t]).max()),
                        float(np.abs(am[0].numpy() - ref["select.action_model"][t]).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/lerobot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--make-vlm", action="store_true", help=f"rewrite OUT/{VLM_DIR} first")
    ap.add_argument("--check", action="store_true", help="reload the folder and compare")
    args = ap.parse_args()
    out = args.out.resolve()
    torch.set_num_threads(1)
    version = lerobot_version()
    case_dir = out / f"v{version}" / "smolvla"
    if args.check:
        worst = check_case(case_dir)
        print(f"v{version}/smolvla: reloaded, max |diff| {worst:.3g}")
        assert worst == 0.0, f"v{version}/smolvla does not reproduce reference.npz ({worst})"
        return
    try:
        import num2words  # noqa: F401
    except ImportError:
        sys.exit('transformers\' SmolVLMProcessor needs num2words (lerobot[smolvla]): '
                 'pip install "num2words>=0.5.14,<0.6"')
    vlm = out / VLM_DIR
    if args.make_vlm or not (vlm / "config.json").exists():
        make_vlm(vlm)
    run_case(case_dir, vlm, args.seed + SEED)
    size = sum(p.stat().st_size for p in case_dir.rglob("*") if p.is_file())
    print(f"v{version}/smolvla: {size / 1e6:.2f} MB; {VLM_DIR}: "
          f"{sum(p.stat().st_size for p in vlm.rglob('*') if p.is_file()) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
