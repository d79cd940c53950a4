"""The manifest's "policy" entry of a pi0-family bundle (pi0, pi05) and the files beside it.

What a LeRobot policy folder says about the robot side of the model, read at compile time so the
runtime's processors (numpy, no LeRobot) need nothing beside the bundle: cameras and their order,
state and action dims, horizon, normalisation and its stats (policy/stats.safetensors), the hub
tokenizer the processor names, and a local `--tokenizer` folder's files (policy/tokenizer/).
A variant compile (random weights) gets `default_policy`: its cameras, no stats, IDENTITY modes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError
from walkforge.recipes.lerobot_release import FolderFacts, decide

STATS_FILE = "policy/stats.safetensors"
TOKENIZER_DIR = "policy/tokenizer"
# what a tokenizer folder may hold; one of the first two is needed (AutoTokenizer reads the rest)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
NORM_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES")  # LeRobot's NormalizationMode names
FEATURE_TYPES = ("VISUAL", "STATE", "ACTION")
STATE_KEY, ACTION_KEY = "observation.state", "action"
LEROBOT_MAX_DIM = 32  # LeRobot's max_state_dim / max_action_dim: pi05's state is padded to it in the prompt


def default_policy(cfg: Any, kind: str) -> dict[str, Any]:
    """The entry of a variant compile: cameras `observation.images.cam_<i>`, the compiled dims,
    every mode IDENTITY (there are no stats), no tokenizer."""
    state_dim = getattr(cfg, "state_dim", LEROBOT_MAX_DIM)  # pi05 takes no state tensor
    return {
        "type": kind,
        "cameras": [{"key": f"observation.images.cam_{i}", "empty": False} for i in range(cfg.num_views)],
        "image_resolution": [cfg.vision.image_size, cfg.vision.image_size],
        "state": {"key": STATE_KEY, "dim": state_dim},
        "action": {"key": ACTION_KEY, "dim": cfg.action_dim},
        "max_state_dim": state_dim, "max_action_dim": cfg.action_dim,
        "chunk_size": cfg.action_horizon, "n_action_steps": cfg.action_horizon,
        "tokenizer_max_length": cfg.max_prompt_len,
        "normalization": dict.fromkeys(FEATURE_TYPES, "IDENTITY"),
        "stats": None, "tokenizer": None, "hub_tokenizer": None, "source": "variant",
    }


def pi0_variant_manifest(cfg: Any) -> dict[str, Any]:
    """`Recipe.variant_manifest` of pi0."""
    return {"policy": default_policy(cfg, "pi0")}


def pi05_variant_manifest(cfg: Any) -> dict[str, Any]:
    """`Recipe.variant_manifest` of pi05."""
    return {"policy": default_policy(cfg, "pi05")}


def bundle_tokenizer(manifest: Mapping[str, Any], folder: Path, cfg: Any
                     ) -> tuple[dict[str, Any], dict[str, Path]]:
    """`Recipe.tokenizer`: the `--tokenizer` folder's files, each checked loadable and its vocab
    within the model's, copied to policy/tokenizer/ and listed in the policy entry."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WalkforgeError(f"--tokenizer {folder}: not a folder")
    names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not {"tokenizer.model", "tokenizer.json"} & set(names):
        raise WalkforgeError(f"--tokenizer {folder}: has neither tokenizer.model (SentencePiece) "
                             "nor tokenizer.json")
    for name in names:
        vocab = _vocab_size(folder / name)
        if vocab is not None and vocab > cfg.llm.vocab:
            raise WalkforgeError(f"--tokenizer {folder / name}: vocab size {vocab} exceeds the "
                                 f"model's llm.vocab {cfg.llm.vocab}")
    if "policy" not in manifest:
        raise WalkforgeError("--tokenizer: this bundle has no policy entry to add it to")
    policy = {**manifest["policy"], "tokenizer": {"dir": TOKENIZER_DIR, "files": names}}
    return {"policy": policy}, {f"{TOKENIZER_DIR}/{n}": folder / n for n in names}


def _vocab_size(path: Path) -> int | None:
    """The vocab size of a tokenizer file (None for the JSON side files, which must only parse)."""
    try:
        if path.name == "tokenizer.model":
            import sentencepiece

            return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
        if path.name == "tokenizer.json":
            import tokenizers

            return tokenizers.Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        json.loads(path.read_text())
    except ImportError as exc:
        raise WalkforgeError(f"--tokenizer: {exc.name} is not installed (pip install "
                             "'walkforge[text]')") from None
    except Exception as exc:  # each library raises its own types for a corrupt file
        raise WalkforgeError(f"--tokenizer {path}: not loadable ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return None


# --- a LeRobot folder's entry: config.json + policy_{pre,post}processor.json + their stats ------

PROCESSORS = ("policy_preprocessor.json", "policy_postprocessor.json")
NORMALIZERS = ("normalizer_processor", "unnormalizer_processor")  # the steps whose state is stats
STATS_NEEDED = {"IDENTITY": (), "MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"),
                "QUANTILES": ("q01", "q99")}
DEFAULT_NORMALIZATION = {"pi0": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
                         "pi05": {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"}}
IMAGES = "observation.images."
RELATIVE_STEPS = ("relative_actions_processor", "delta_actions_processor")  # 0.6.x's name, 0.5.1's


def lerobot_cameras(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The compiled views: config.json's VISUAL input_features in order, then the empty cameras
    (`observation.images.empty_camera_<i>`, i < empty_cameras, whether listed or not)."""
    visual = [k for k, f in (meta.get("input_features") or {}).items() if f.get("type") == "VISUAL"]
    empty = [f"{IMAGES}empty_camera_{i}" for i in range(int(meta.get("empty_cameras", 0)))]
    empty += [k for k in visual if k.startswith(f"{IMAGES}empty_camera_") and k not in empty]
    return ([{"key": k, "empty": False} for k in visual if k not in empty]
            + [{"key": k, "empty": True} for k in empty])


def lerobot_policy(folder: Path, meta: Mapping[str, Any], cfg: Any, kind: str, *,
                   weight_keys: frozenset[str] = frozenset(), lerobot_version: str | None = None,
                   processors: Path | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The policy entry of a LeRobot folder (checked against the compiled `cfg`) and its stats
    file: each field from config.json, the normalisation, stats and action steps from the
    processor JSONs (in `processors` when given, else in the folder; a folder without them is
    model-only: its bundle runs `infer`, not the policy API), the LeRobot release's semantics
    from the folder's markers (recipes/lerobot_release.py) or `lerobot_version`."""
    cameras = lerobot_cameras(meta) or default_policy(cfg, kind)["cameras"]
    max_state = int(meta.get("max_state_dim", getattr(cfg, "state_dim", LEROBOT_MAX_DIM)))
    max_action = int(meta.get("max_action_dim", cfg.action_dim))
    _agree("max_action_dim", max_action, "model.action_in_proj takes", cfg.action_dim)
    if hasattr(cfg, "state_dim"):
        _agree("max_state_dim", max_state, "model.state_proj takes", cfg.state_dim)
    _agree("input_features cameras + empty_cameras", len(cameras), "the compiled num_views", cfg.num_views)
    resolution = list(meta.get("image_resolution") or [cfg.vision.image_size] * 2)
    _agree("image_resolution", resolution, "the vision tower's position embedding fits",
           [cfg.vision.image_size] * 2)
    chunk = cfg.action_horizon
    steps = int(meta.get("n_action_steps", chunk))
    if not 1 <= steps <= chunk:
        raise WalkforgeError(f"config.json: n_action_steps {steps} must be in [1, chunk_size {chunk}]")
    source = Path(processors) if processors is not None else Path(folder)
    found = read_processors(source)
    if processors is not None and not found:
        raise WalkforgeError(f"--processors {source}: holds neither {' nor '.join(PROCESSORS)}")
    processors_entry = _processors_entry(found, source, processors is not None)
    normalization = _normalization(meta, found, kind)
    stats = merged_stats(source, found)
    state = _feature_dim(meta, "input_features", STATE_KEY, max_state)
    action = _feature_dim(meta, "output_features", ACTION_KEY, max_action)
    if found:
        _check_stats(normalization, stats, {"STATE": (STATE_KEY, state), "ACTION": (ACTION_KEY, action)})
    shapes = {k: tuple(v.shape) for k, v in stats.items()}  # a stat both files hold: as the preprocessor's
    facts = FolderFacts(meta, frozenset(s.get("registry_name") for ss in found.values() for s in ss),
                        shapes, weight_keys)
    release = decide(facts, lerobot_version)
    entry = {
        "type": kind, "cameras": cameras, "image_resolution": resolution,
        "state": {"key": STATE_KEY, "dim": state}, "action": {"key": ACTION_KEY, "dim": action},
        "max_state_dim": max_state, "max_action_dim": max_action,
        "chunk_size": chunk, "n_action_steps": steps, "tokenizer_max_length": cfg.max_prompt_len,
        "normalization": normalization, "stats": STATS_FILE if stats else None, "tokenizer": None,
        "hub_tokenizer": _hub_tokenizer(found), "source": "lerobot",
        "lerobot": release.entry(),
        "processors": processors_entry,
        "relative_actions": relative_actions(found, action, state),
    }
    if kind == "pi05":
        entry["prompt_state_dims"] = release.prompt_state_dims(state, max_state)
    return entry, ({STATS_FILE: _stats_bytes(stats)} if stats else {})


def _processors_entry(found: Mapping[str, Any], source: Path, given: bool) -> dict[str, Any] | None:
    """Where the processor JSONs came from; None for a model-only folder. Both or neither."""
    if not found:
        return None
    if len(found) != len(PROCESSORS):
        have, lack = next(iter(found)), next(n for n in PROCESSORS if n not in found)
        raise WalkforgeError(f"{source} has {have} but not {lack}: LeRobot saves both")
    return {"files": list(PROCESSORS), "from": "--processors" if given else "folder"}


def relative_actions(processors: Mapping[str, list[dict[str, Any]]], action_dim: int, state_dim: int
                     ) -> dict[str, Any] | None:
    """LeRobot's absolute_actions_processor (postprocessor), when enabled: the action dims that get
    the observation's raw state added back (`mask`), from the paired relative step's (RELATIVE_STEPS)
    exclude_joints and action_names. None when the step is absent or disabled."""
    post = _step(processors, PROCESSORS[1], "absolute_actions_processor")
    if not (post and (post.get("config") or {}).get("enabled")):
        return None
    pre = next(filter(None, (_step(processors, PROCESSORS[0], n) for n in RELATIVE_STEPS)), None)
    if pre is None:
        raise WalkforgeError(f"{PROCESSORS[1]}: absolute_actions_processor is enabled but {PROCESSORS[0]} "
                             f"has no {' / '.join(RELATIVE_STEPS)} step to take the state from")
    config = pre.get("config") or {}
    mask = relative_mask(config.get("exclude_joints") or [], config.get("action_names"), action_dim)
    if state_dim < action_dim:
        raise WalkforgeError(f"relative actions add the state to the actions, but the state has {state_dim} "
                             f"dims and the action {action_dim}")
    return {"mask": mask, "exclude_joints": list(config.get("exclude_joints") or []),
            "action_names": config.get("action_names")}


def relative_mask(exclude: list[str], names: list[str] | None, action_dim: int) -> list[bool]:
    """LeRobot's rule: dim j is relative unless an exclude entry equals or is a substring of
    action name j (case-insensitive); dims past the names, or all when names is None, are relative."""
    tokens = [str(e).lower() for e in exclude if e]
    if not tokens or names is None:
        return [True] * action_dim
    mask = [not any(t == str(n).lower() or t in str(n).lower() for t in tokens) for n in names[:action_dim]]
    return mask + [True] * (action_dim - len(mask))


def _step(processors: Mapping[str, list[dict[str, Any]]], file: str, name: str) -> dict[str, Any] | None:
    return next((s for s in processors.get(file, []) if s.get("registry_name") == name), None)


def _agree(field: str, said: Any, what: str, has: Any) -> None:
    """A config.json field must equal what the tensors (or compiled config) have; one line if not."""
    if said != has:
        raise WalkforgeError(f"config.json {field} is {said} but {what} {has}")


def _feature_dim(meta: Mapping[str, Any], group: str, key: str, most: int) -> int:
    """The robot's dim of feature `key` (its shape in config.json), at most the padded `most`;
    `most` when the feature is not listed."""
    feature = (meta.get(group) or {}).get(key)
    if feature is None:
        return most
    shape = feature.get("shape") or []
    if len(shape) != 1 or not 1 <= int(shape[0]) <= most:
        raise WalkforgeError(f"config.json {group}.{key}.shape is {shape}: want [d] with 1 ≤ d ≤ {most}")
    return int(shape[0])


def read_processors(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The steps of each processor JSON present (by file name); each step has `registry_name`
    (or `class`), `config` and, when it has state, `state_file`."""
    steps = {}
    for name in PROCESSORS:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            steps[name] = [dict(s) for s in data["steps"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise WalkforgeError(f"{path}: not a LeRobot processor file ({type(exc).__name__}: "
                                 f"{exc})") from None
    return steps


def _normalizer_steps(processors: Mapping[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, s) for name, steps in processors.items() for s in steps
            if s.get("registry_name") in NORMALIZERS]


def _normalization(meta: Mapping[str, Any], processors: Mapping[str, list[dict[str, Any]]],
                   kind: str) -> dict[str, str]:
    """config.json's normalization_mapping (LeRobot's default for `kind` when absent); each
    (un)normalizer step's norm_map must agree with it."""
    mapping = {**DEFAULT_NORMALIZATION[kind], **(meta.get("normalization_mapping") or {})}
    for feature_type, mode in mapping.items():
        if mode not in NORM_MODES:
            raise WalkforgeError(f"config.json normalization_mapping.{feature_type} is '{mode}': "
                                 f"one of {', '.join(NORM_MODES)}")
    if mapping.get("VISUAL", "IDENTITY") != "IDENTITY":
        raise WalkforgeError(f"config.json normalization_mapping.VISUAL is {mapping['VISUAL']}: only "
                             "IDENTITY is supported (images go to [-1, 1] as pi0 trains them)")
    for name, step in _normalizer_steps(processors):
        for feature_type, mode in (step.get("config") or {}).get("norm_map", {}).items():
            if mapping.get(feature_type, mode) != mode:
                raise WalkforgeError(f"{name} {step['registry_name']} normalises {feature_type} with "
                                     f"{mode} but config.json normalization_mapping says "
                                     f"{mapping[feature_type]}")
    return {t: mapping[t] for t in FEATURE_TYPES if t in mapping}


def merged_stats(folder: Path, processors: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The (un)normalizer steps' stats files merged, float32 tensors `<feature>.<stat>`; a stat
    both files hold must be equal in both."""
    from safetensors.torch import load_file

    stats: dict[str, Any] = {}
    for name, step in _normalizer_steps(processors):
        file = step.get("state_file")
        if not file:
            continue
        if Path(file).name != file:
            raise WalkforgeError(f"{name}: state_file '{file}' must be a file name in the folder")
        path = Path(folder) / file
        if not path.is_file():
            raise WalkforgeError(f"{name} names {file}, which {folder} lacks")
        try:
            part = {k: v.float() for k, v in load_file(str(path)).items()}
        except Exception as exc:  # safetensors raises its own types for corrupt headers
            raise WalkforgeError(f"{path}: not a readable safetensors file ({exc})") from None
        for key, tensor in part.items():
            if key in stats and not _same_values(stats[key], tensor):
                raise WalkforgeError(f"{file}: stat '{key}' differs from the one in another stats file")
            stats[key] = stats.get(key, tensor)
    return stats


def _same_values(a: Any, b: Any) -> bool:
    """Stats compared by value, whatever their shape: LeRobot ≥ 0.6 saves a camera's (1,) count
    as (1, 1, 1) in the preprocessor's file and as (1,) in the postprocessor's."""
    return a.numel() == b.numel() and bool((a.flatten() == b.flatten()).all())


def _check_stats(normalization: Mapping[str, str], stats: Mapping[str, Any],
                 features: Mapping[str, tuple[str, int]]) -> None:
    """Every stat a mode needs is there, one value per robot dim."""
    for feature_type, (key, dim) in features.items():
        for stat in STATS_NEEDED[normalization.get(feature_type, "IDENTITY")]:
            name = f"{key}.{stat}"
            if name not in stats:
                raise WalkforgeError(f"{feature_type} is normalised with {normalization[feature_type]} but "
                                     f"no processor stats file holds '{name}'")
            if tuple(stats[name].shape) != (dim,):
                raise WalkforgeError(f"stat '{name}' has shape {list(stats[name].shape)}, the feature has "
                                     f"dim {dim}")


def _stats_bytes(stats: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sorted(stats.items())})


def _hub_tokenizer(processors: Mapping[str, list[dict[str, Any]]]) -> str | None:
    """The hub tokenizer the preprocessor's tokenizer step names (for run-time messages)."""
    for step in processors.get(PROCESSORS[0], []):
        if step.get("registry_name") == "tokenizer_processor":
            return (step.get("config") or {}).get("tokenizer_name")
    return None
