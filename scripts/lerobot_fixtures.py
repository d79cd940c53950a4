#!/usr/bin/env python
"""Reference fixtures for walkforge's LeRobot readers, written and computed by LeRobot's OWN code.

Runs inside a LeRobot venv built by scripts/lerobot_venv.sh (one per release) and writes, for that
release, `OUT/v<version>/<case>/`:

  folder/          what LeRobot's save_pretrained wrote (policy + both processor pipelines), untouched
  reference.npz    the raw observations fed, the noise given, LeRobot's outputs and its preprocessed
                   batch (see reference.json "npz" for every key)
  reference.json   versions, tiny sizes, walkforge --config overrides, observations, what each omits

Only sizes are patched (LeRobot's get_gemma_config and its PaliGemma / Gemma-expert classes get
tiny configs: walkforge's `tiny` pi0); everything that computes is LeRobot's. The tokenizer is a
SentencePiece model trained on the fly by tests/lerobot_folder.write_tokenizer(fast=True), made
once by `--make-tokenizer` (run that in the lerobot-0.4.4 venv: transformers 4.53 saves the
tokenizer_config.json every release loads, with add_bos_token) into OUT/tokenizer/.

    V=/work/venvs/lerobot-0.4.4/bin/python; $V scripts/lerobot_fixtures.py --make-tokenizer
    for v in 0.4.4 0.5.1 0.6.1; do /work/venvs/lerobot-$v/bin/python scripts/lerobot_fixtures.py; done
    /work/venvs/lerobot-0.6.1/bin/python scripts/lerobot_fixtures.py --check

(--out defaults to tests/fixtures/lerobot.)

`--check` loads every folder of this release back with LeRobot's from_pretrained (policy and both
pipelines) and confirms it reproduces reference.npz exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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

ROOT = Path(__file__).resolve().parents[1]

# walkforge's `tiny` pi0 (walkforge/recipes/pi0/config.py VARIANTS["tiny"]).
TINY = {
    "vision": {"width": 32, "layers": 2, "heads": 2, "mlp": 64, "patch": 14, "image": 224},
    "llm": {"width": 64, "layers": 2, "heads": 2, "kv_heads": 1, "head_dim": 16, "mlp": 128, "vocab": 1000},
    "expert": {"width": 32, "layers": 2, "heads": 2, "kv_heads": 1, "head_dim": 16, "mlp": 64},
}
EXPERT_VOCAB = 16  # the expert's lm_head is never used; LeRobot hard-codes 257152 rows
# walkforge reads widths from tensor shapes; head counts / head sizes come from --config.
WALKFORGE_CONFIG = {"vision": {"heads": 2}, "llm": {"heads": 2, "head_dim": 16},
                    "expert": {"heads": 2, "head_dim": 16}}

CAMERAS = ("base", "wrist")
EMPTY_CAMERAS = 1
IMAGE_HW = (48, 64)  # not the model's 224x224: resize-with-pad is exercised (with padding)
SQUARE_HW = (56, 56)  # observation d: resized to 224x224 without padding (0.4.4's -3 pad cannot show)
STATE_DIM = ACTION_DIM = 6
CHUNK, N_ACTION_STEPS, STEPS = 10, 5, 3
ACTION_NAMES = ["shoulder", "elbow", "wrist_flex", "wrist_roll", "base", "gripper"]
SHORT = {"a": "pick up the red block", "b": "open the top drawer", "d": "close the door slowly"}
LONG = ("pick up the red block and put it in the box, then open the top drawer and close the door "
        "slowly, move the arm to the left and stack the green cups; after that fold the towel, "
        "put the towel in the box, open the top drawer again, pick up the green cups one by one, "
        "stack them on the red block, close the top drawer and move the arm back to the right")


CASE_SEEDS = {"pi0": 0, "pi05": 10, "pi0_relative": 20, "pi05_relative": 30}  # same in every release


def lerobot_version() -> str:
    return importlib.metadata.version("lerobot")


def vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3])


def has_relative_actions() -> bool:
    return importlib.util.find_spec("lerobot.processor.relative_action_processor") is not None


def cases_for(version: str) -> list[str]:
    cases = ["pi0", "pi05"]
    if has_relative_actions():
        cases += ["pi0_relative", "pi05_relative"]
    return cases


def prompt_len(kind: str, version: str) -> int:
    """tokenizer_max_length: pi0's short tasks fit in 16; pi05's prompt carries the state (6 dims since
    0.5, all 32 padded dims in 0.4.x, ~156 tokens with this tokenizer)."""
    if kind == "pi0":
        return 16
    return 200 if vtuple(version) < (0, 5) else 64


# --- tiny sizes ---------------------------------------------------------------------------------

def patch_tiny(mod) -> None:
    """Give LeRobot's modeling module `mod` (pi0 or pi05) walkforge's tiny sizes: its
    get_gemma_config, and its PaliGemma / expert classes with tiny SigLIP, vocab and projector."""
    gemma = mod.GemmaConfig
    llm, exp = TINY["llm"], TINY["expert"]
    sizes = {
        "gemma_2b": gemma(width=llm["width"], depth=llm["layers"], mlp_dim=llm["mlp"],
                          num_heads=llm["heads"], num_kv_heads=llm["kv_heads"], head_dim=llm["head_dim"]),
        "gemma_300m": gemma(width=exp["width"], depth=exp["layers"], mlp_dim=exp["mlp"],
                            num_heads=exp["heads"], num_kv_heads=exp["kv_heads"], head_dim=exp["head_dim"]),
    }
    mod.get_gemma_config = lambda variant: sizes[variant]

    vlm_name = next(n for n in ("PaliGemmaForConditionalGenerationWithPiGemma",  # >= 0.5
                                "PaliGemmaForConditionalGeneration") if hasattr(mod, n))
    vlm_base = getattr(mod, vlm_name)
    if not getattr(vlm_base, "_walkforge_tiny", False):
        vis = TINY["vision"]

        class TinyVLM(vlm_base):
            _walkforge_tiny = True

            def __init__(self, config, *args, **kwargs):
                v = config.vision_config
                v.hidden_size, v.num_hidden_layers = vis["width"], vis["layers"]
                v.num_attention_heads, v.intermediate_size = vis["heads"], vis["mlp"]
                v.patch_size, v.image_size = vis["patch"], vis["image"]
                v.projection_dim = config.text_config.hidden_size
                if hasattr(config, "projection_dim"):
                    config.projection_dim = config.text_config.hidden_size
                config.text_config.vocab_size = TINY["llm"]["vocab"]
                if "_vocab_size" in vars(config):
                    config._vocab_size = TINY["llm"]["vocab"]
                super().__init__(config, *args, **kwargs)

        TinyVLM.__name__, TinyVLM.__qualname__ = vlm_base.__name__, vlm_base.__qualname__
        setattr(mod, vlm_name, TinyVLM)

    exp_name = next(n for n in ("PiGemmaForCausalLM", "GemmaForCausalLM") if hasattr(mod, n))
    exp_base = getattr(mod, exp_name)
    if not getattr(exp_base, "_walkforge_tiny", False):

        class TinyExpert(exp_base):
            _walkforge_tiny = True

            def __init__(self, config, *args, **kwargs):
                config.vocab_size = EXPERT_VOCAB
                super().__init__(config, *args, **kwargs)

        TinyExpert.__name__, TinyExpert.__qualname__ = exp_base.__name__, exp_base.__qualname__
        setattr(mod, exp_name, TinyExpert)


def perturb(policy, seed: int) -> None:
    """Seeded random weights: matrices N(0, 1/fan_in); every vector (norm scales, biases, adaRMS
    and LayerNorm params) moved off its init by N(0, 0.1²), so a missing norm or bias shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(policy.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


# --- inputs ---------------------------------------------------------------------------------------

def stats(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Dataset statistics as a LeRobot dataset holds them (images (3,1,1), count (1,))."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, dim in (("observation.state", STATE_DIM), ("action", ACTION_DIM)):
        mean = rng.normal(0, 1, dim).astype(np.float32)
        std = (0.5 + rng.random(dim)).astype(np.float32)
        out[key] = {"mean": mean, "std": std, "min": mean - 3 * std, "max": mean + 3 * std,
                    "q01": mean - 2 * std, "q10": mean - 1.2 * std, "q50": mean + 0.05 * std,
                    "q90": mean + 1.3 * std, "q99": mean + 2.1 * std,
                    "count": np.array([1000], dtype=np.int64)}
    for cam in CAMERAS:
        m = rng.uniform(0.3, 0.6, (3, 1, 1)).astype(np.float32)
        out[f"observation.images.{cam}"] = {
            "mean": m, "std": np.full((3, 1, 1), 0.25, np.float32), "min": np.zeros((3, 1, 1), np.float32),
            "max": np.ones((3, 1, 1), np.float32), "q01": np.full((3, 1, 1), 0.01, np.float32),
            "q99": np.full((3, 1, 1), 0.99, np.float32), "count": np.array([1000], dtype=np.int64)}
    return {k: {s: v.astype(np.float32) if s != "count" else v for s, v in d.items()} for k, d in out.items()}


def observations(seed: int, st: dict) -> dict[str, dict]:
    """(a) all cameras, short task; (b) the first real camera missing, one state dim above q99;
    (c) a task longer than tokenizer_max_length; (d) all cameras, square images (no padding after
    the resize). States in robot units."""
    rng = np.random.default_rng(seed)
    mean, std = st["observation.state"]["mean"], st["observation.state"]["std"]

    def image(hw):
        yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
        base = (rng.uniform(0, 255) + rng.uniform(-3, 3) * yy + rng.uniform(-2, 2) * xx)[..., None]
        noise = rng.normal(0, 25, (*hw, 3))
        return np.clip(base + noise, 0, 255).astype(np.uint8)

    obs = {}
    for name in ("a", "b", "c", "d"):
        state = (mean + std * rng.uniform(-1.5, 1.5, STATE_DIM)).astype(np.float32)
        if name == "b":
            state[2] = mean[2] + 2.6 * std[2]
        cams = {c: image(SQUARE_HW if name == "d" else IMAGE_HW) for c in CAMERAS}
        omits = []
        if name == "b":
            omits = [f"observation.images.{CAMERAS[0]}"]
            cams.pop(CAMERAS[0])
        task = LONG if name == "c" else SHORT[name]
        obs[name] = {"task": task, "state": state, "images": cams, "omits": omits}
    return obs


def raw_observation(o: dict) -> dict[str, np.ndarray]:
    raw = {f"observation.images.{c}": img.copy() for c, img in o["images"].items()}
    raw["observation.state"] = o["state"].copy()
    return raw


# --- LeRobot --------------------------------------------------------------------------------------

def lerobot_modules(kind: str):
    base = "pi0" if kind.startswith("pi0") and not kind.startswith("pi05") else "pi05"
    cfg_mod = importlib.import_module(f"lerobot.policies.{base}.configuration_{base}")
    model_mod = importlib.import_module(f"lerobot.policies.{base}.modeling_{base}")
    proc_mod = importlib.import_module(f"lerobot.policies.{base}.processor_{base}")
    cfg_cls = getattr(cfg_mod, "PI0Config" if base == "pi0" else "PI05Config")
    pol_cls = getattr(model_mod, "PI0Policy" if base == "pi0" else "PI05Policy")
    return base, cfg_cls, pol_cls, model_mod, proc_mod


@contextlib.contextmanager
def local_tokenizer(proc_mod, name: str):
    """The processor factory names the hub tokenizer; build the step from `name` (a local folder)."""
    original = proc_mod.TokenizerProcessorStep

    def step(*args, **kwargs):
        kwargs["tokenizer_name"] = name
        return original(*args, **kwargs)

    proc_mod.TokenizerProcessorStep = step
    try:
        yield
    finally:
        proc_mod.TokenizerProcessorStep = original


@contextlib.contextmanager
def chdir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def make_config(kind: str, version: str):
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature

    base, cfg_cls, *_ = lerobot_modules(kind)
    inputs = {f"observation.images.{c}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, *IMAGE_HW))
              for c in CAMERAS}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    mode = NormalizationMode.MEAN_STD if base == "pi0" else NormalizationMode.QUANTILES
    kwargs = dict(
        input_features=inputs,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        chunk_size=CHUNK, n_action_steps=N_ACTION_STEPS, num_inference_steps=STEPS,
        tokenizer_max_length=prompt_len(base, version), max_state_dim=32, max_action_dim=32,
        empty_cameras=EMPTY_CAMERAS, device="cpu", dtype="float32",
        image_resolution=(TINY["vision"]["image"],) * 2,
        normalization_mapping={"VISUAL": NormalizationMode.IDENTITY, "STATE": mode, "ACTION": mode},
    )
    if kind.endswith("_relative"):
        kwargs |= dict(use_relative_actions=True, relative_exclude_joints=["gripper"],
                       action_feature_names=list(ACTION_NAMES))
    return cfg_cls(**kwargs)


class Recorder:
    """Hooks on the policy: the noise each inference draws comes from a queue we fill, and the images
    LeRobot's _preprocess_images hands the model (after resize-with-pad, in [-1, 1]) are kept."""

    def __init__(self, policy):
        self.noise: list[torch.Tensor] = []
        self.drawn: list[torch.Tensor] = []
        self.images = None
        model = policy.model
        orig_pre = policy._preprocess_images

        def sample_noise(shape, device):
            assert self.noise, "no noise queued"
            n = self.noise.pop(0)
            assert tuple(n.shape) == tuple(shape), (n.shape, shape)
            self.drawn.append(n)
            return n.to(device)

        def preprocess_images(batch):
            images, masks = orig_pre(batch)
            self.images = ([i.detach().clone() for i in images], [m.detach().clone() for m in masks])
            return images, masks

        model.sample_noise = sample_noise
        policy._preprocess_images = preprocess_images


def image_summary(images, masks, prefix: str, out: dict) -> None:
    """Per image slot as fed to SigLIP: mask, per-channel row and column means (3, 224) each, the
    top-left pixel (padding when the image is padded) and the min. Full images would be 600 kB each."""
    for k, (img, m) in enumerate(zip(images, masks, strict=True)):
        x = img[0].float()
        out[f"{prefix}.slot{k}.mask"] = m.numpy().astype(np.bool_)
        out[f"{prefix}.slot{k}.rowmean"] = x.mean(dim=2).numpy()
        out[f"{prefix}.slot{k}.colmean"] = x.mean(dim=1).numpy()
        out[f"{prefix}.slot{k}.corner"] = x[:, 0, 0].numpy()
        out[f"{prefix}.slot{k}.min"] = np.float32(x.min().item())


def run_case(kind: str, version: str, case_dir: Path, tokenizer: Path, seed: int) -> dict:
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.utils import prepare_observation_for_inference
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    base, _, pol_cls, model_mod, proc_mod = lerobot_modules(kind)
    patch_tiny(model_mod)
    cfg = make_config(kind, version)
    torch.manual_seed(seed)
    policy = pol_cls(cfg)
    pg = policy.model.paligemma_with_expert.paligemma
    # 0.4.x ties the VLM's embed_tokens to its lm_head (one Parameter, saved once as lm_head); from
    # 0.5 they are two Parameters, both saved, and `perturb` draws them independently.
    tied = pg.lm_head.weight is pg.get_input_embeddings().weight
    perturb(policy, seed)
    policy.eval()

    st = stats(seed + 1)
    dataset_stats = {k: {s: torch.from_numpy(np.asarray(v)) for s, v in d.items()} for k, d in st.items()}
    folder = case_dir / "folder"
    if case_dir.exists():
        shutil.rmtree(case_dir)
    folder.mkdir(parents=True)
    tok_rel = os.path.relpath(tokenizer, folder)
    with chdir(folder), local_tokenizer(proc_mod, tok_rel):
        pre, post = make_pre_post_processors(cfg, dataset_stats=dataset_stats)
        policy.save_pretrained(folder)
        pre.save_pretrained(folder)
        post.save_pretrained(folder)

    rec = Recorder(policy)
    obs = observations(seed + 2, st)
    out: dict[str, np.ndarray] = {}
    meta_obs = {}
    gen = torch.Generator().manual_seed(seed + 3)
    with chdir(folder):
        for name, o in obs.items():
            for c, img in o["images"].items():
                out[f"{name}.image.{c}"] = img
            out[f"{name}.state"] = o["state"]
            noise = torch.randn((1, CHUNK, 32), generator=gen)
            out[f"{name}.noise"] = noise.numpy()
            rec.noise = [noise]
            batch = prepare_observation_for_inference(raw_observation(o), torch.device("cpu"), o["task"], "")
            batch = pre(batch)
            chunk_model = policy.predict_action_chunk(batch)
            chunk = post(chunk_model)
            assert not rec.noise and rec.drawn[-1] is noise
            out[f"{name}.chunk"] = chunk[0].numpy().astype(np.float32)
            out[f"{name}.chunk_model"] = chunk_model[0].numpy().astype(np.float32)
            out[f"{name}.pre.state"] = batch["observation.state"][0].numpy()
            out[f"{name}.pre.tokens"] = batch[OBS_LANGUAGE_TOKENS][0].numpy().astype(np.int64)
            out[f"{name}.pre.attention_mask"] = batch[OBS_LANGUAGE_ATTENTION_MASK][0].numpy().astype(np.bool_)
            image_summary(*rec.images, f"{name}.pre.image", out)
            text = batch.get("task")
            text = text[0] if isinstance(text, list) else text
            tokenizer_step = next(s for s in pre.steps if hasattr(s, "input_tokenizer"))
            full = tokenizer_step.input_tokenizer(text)["input_ids"]
            present = [k for k in policy.config.image_features if k in batch]
            missing = [k for k in policy.config.image_features if k not in batch]
            meta_obs[name] = {
                "task": o["task"], "omits": o["omits"],
                "cameras_fed": sorted(o["images"]),
                "image_hwc": list(next(iter(o["images"].values())).shape),
                "tokenized_text": text,
                "prompt_tokens_before_truncation": len(full),
                "truncated": len(full) > cfg.tokenizer_max_length,
                "image_slots": [{"feature": k, "mask": k in present} for k in present + missing],
            }

        # select_action: n_action_steps + 1 calls on observation d (no padding), the state drifting
        # each call, noise per inference.
        o = obs["d"]
        policy.reset()
        calls = N_ACTION_STEPS + 1
        inferences = math.ceil(calls / N_ACTION_STEPS)
        noises = [torch.randn((1, CHUNK, 32), generator=gen) for _ in range(inferences)]
        rec.noise, rec.drawn = list(noises), []
        states, acts, acts_model = [], [], []
        for t in range(calls):
            state = (o["state"] + 0.05 * t * st["observation.state"]["std"]).astype(np.float32)
            batch = pre(prepare_observation_for_inference(raw_observation(o | {"state": state}),
                                                          torch.device("cpu"), o["task"], ""))
            a_model = policy.select_action(batch)
            a = post(a_model)
            states.append(state)
            acts_model.append(a_model[0].numpy())
            acts.append(a[0].numpy())
        assert not rec.noise and len(rec.drawn) == len(noises)
        out["select.state"] = np.stack(states).astype(np.float32)
        out["select.noise"] = torch.stack(noises).numpy()
        out["select.action"] = np.stack(acts).astype(np.float32)
        out["select.action_model"] = np.stack(acts_model).astype(np.float32)

    np.savez_compressed(case_dir / "reference.npz", **out)
    files = sorted(p.name for p in folder.iterdir())
    cfg_json = json.loads((folder / "config.json").read_text())
    meta = {
        "lerobot": version, "case": kind, "policy_type": base,
        "versions": {"lerobot": version, "torch": torch.__version__,
                     "transformers": importlib.metadata.version("transformers"),
                     "numpy": np.__version__, "python": platform.python_version()},
        "generator": "scripts/lerobot_fixtures.py (venv: scripts/lerobot_venv.sh)",
        "seed": seed,
        "tiny": TINY | {"expert_lm_head_vocab": EXPERT_VOCAB},
        "walkforge_config": WALKFORGE_CONFIG,
        "sizes": {"chunk_size": CHUNK, "n_action_steps": N_ACTION_STEPS, "num_inference_steps": STEPS,
                  "tokenizer_max_length": cfg.tokenizer_max_length, "max_state_dim": 32, "max_action_dim": 32,
                  "state_dim": STATE_DIM, "action_dim": ACTION_DIM, "image_resolution": [224, 224],
                  "camera_image_hwc": {"a, b, c": [*IMAGE_HW, 3], "d": [*SQUARE_HW, 3]}},
        "cameras": [f"observation.images.{c}" for c in CAMERAS],
        "empty_cameras": EMPTY_CAMERAS,
        "normalization": cfg_json.get("normalization_mapping"),
        "relative_actions": ({"use_relative_actions": True, "relative_exclude_joints": ["gripper"],
                              "action_feature_names": ACTION_NAMES} if kind.endswith("_relative") else None),
        "embed_tokens_tied_to_lm_head_in_model": tied,
        "saved_embedding_keys": embedding_keys(folder),
        "tokenizer": {"folder": "tests/fixtures/lerobot/tokenizer", "name_in_processor_json": tok_rel,
                      "note": "relative to folder/: load with folder/ as cwd, or override tokenizer_name"},
        "folder_files": files,
        "observations": meta_obs,
        "select_action": {"calls": calls, "observation": "d, with state d + 0.05*t*std(state) at call t",
                          "inferences": len(noises)},
        "npz": {
            "<o>.image.<camera>": "uint8 HWC image fed (o in a, b, c, d); an omitted camera has no key",
            "<o>.state": "float32 (6,) robot units fed",
            "<o>.noise": "float32 (1, chunk_size, max_action_dim) noise the one inference drew",
            "<o>.chunk": "float32 (chunk_size, 6): predict_action_chunk then the postprocessor (robot units)",
            "<o>.chunk_model": "float32 (chunk_size, 6): predict_action_chunk (model space)",
            "<o>.pre.state": "preprocessed observation.state (normalised, not padded)",
            "<o>.pre.tokens / .pre.attention_mask": "the tokenizer step's output",
            "<o>.pre.image.slot<k>.*": "image slot k as fed to SigLIP (order: present cameras in config "
                                        "order, then missing ones incl. empty cameras): mask, "
                                        "rowmean/colmean (3,224), corner pixel [:,0,0], min",
            "select.state": "(calls, 6) state fed at each select_action call (images/task of d)",
            "select.noise": "(inferences, 1, chunk_size, 32) noise per inference, in order",
            "select.action": "(calls, 6) select_action then the postprocessor",
            "select.action_model": "(calls, 6) select_action (model space)",
        },
    }
    (case_dir / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def embedding_keys(folder: Path) -> dict:
    """Which of the VLM's embed_tokens / lm_head model.safetensors holds, and whether they differ."""
    from safetensors import safe_open

    pg = "model.paligemma_with_expert.paligemma."
    names = {"embed_tokens": pg + "model.language_model.embed_tokens.weight",
             "lm_head": pg + "lm_head.weight"}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        held = {n: k in keys for n, k in names.items()}
        differ = (bool((f.get_tensor(names["embed_tokens"]) != f.get_tensor(names["lm_head"])).any())
                  if all(held.values()) else None)
        metadata = f.metadata() or {}
    return {"held": held, "differ": differ, "safetensors_metadata": metadata}


def check_case(kind: str, version: str, case_dir: Path) -> float:
    """Reload the folder with LeRobot's from_pretrained and recompute everything in reference.npz."""
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.utils import prepare_observation_for_inference

    base, cfg_cls, pol_cls, model_mod, _ = lerobot_modules(kind)
    patch_tiny(model_mod)
    folder = case_dir / "folder"
    ref = dict(np.load(case_dir / "reference.npz"))
    meta = json.loads((case_dir / "reference.json").read_text())
    worst = 0.0
    with chdir(folder), contextlib.redirect_stdout(sys.stderr):
        policy = pol_cls.from_pretrained(str(folder))
        policy.eval()
        pre, post = make_pre_post_processors(policy.config, pretrained_path=str(folder))
        rec = Recorder(policy)
        for name, om in meta["observations"].items():
            raw = {f"observation.images.{c}": ref[f"{name}.image.{c}"] for c in om["cameras_fed"]}
            raw["observation.state"] = ref[f"{name}.state"]
            rec.noise = [torch.from_numpy(ref[f"{name}.noise"])]
            batch = pre(prepare_observation_for_inference(raw, torch.device("cpu"), om["task"], ""))
            cm = policy.predict_action_chunk(batch)
            c = post(cm)
            for key, got in ((f"{name}.chunk", c[0]), (f"{name}.chunk_model", cm[0])):
                worst = max(worst, float(np.abs(got.numpy() - ref[key]).max()))
        policy.reset()
        rec.noise = [torch.from_numpy(n) for n in ref["select.noise"]]
        o = meta["observations"]["d"]
        for t, state in enumerate(ref["select.state"]):
            raw = {f"observation.images.{c}": ref[f"d.image.{c}"] for c in o["cameras_fed"]}
            raw["observation.state"] = state
            batch = pre(prepare_observation_for_inference(raw, torch.device("cpu"), o["task"], ""))
            am = policy.select_action(batch)
            a = post(am)
            worst = max(worst, float(np.abs(a[0].numpy() - ref["select.action"][t]).max()),
                        float(np.abs(am[0].numpy() - ref["select.action_model"][t]).max()))
    return worst


def make_tokenizer(out: Path) -> Path:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # lerobot_folder imports walkforge
    from lerobot_folder import write_tokenizer

    folder = out / "tokenizer"
    if folder.exists():
        shutil.rmtree(folder)
    return write_tokenizer(folder, fast=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/lerobot")
    ap.add_argument("--cases", nargs="*", help="default: every case this release has")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--make-tokenizer", action="store_true", help="write OUT/tokenizer and stop")
    ap.add_argument("--check", action="store_true", help="reload the folders and compare")
    args = ap.parse_args()
    out = args.out.resolve()
    torch.set_num_threads(1)
    if args.make_tokenizer:
        print(make_tokenizer(out))
        return
    version = lerobot_version()
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        sys.exit(f"{tokenizer} is missing: run --make-tokenizer first (in the lerobot-0.4.4 venv)")
    cases = args.cases or cases_for(version)
    for kind in cases:
        case_dir = out / f"v{version}" / kind
        if args.check:
            worst = check_case(kind, version, case_dir)
            print(f"v{version}/{kind}: reloaded, max |diff| {worst:.3g}")
            assert worst == 0.0, f"v{version}/{kind} does not reproduce reference.npz ({worst})"
        else:
            seed = args.seed + CASE_SEEDS[kind]
            run_case(kind, version, case_dir, tokenizer, seed)
            size = sum(p.stat().st_size for p in case_dir.rglob("*") if p.is_file())
            print(f"v{version}/{kind}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
