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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from walkforge.errors import WalkforgeError
from walkforge.recipes.lerobot_release import FolderFacts, decide
from walkforge.recipes.weights import read_weights

if TYPE_CHECKING:
    import torch

STATS_FILE = "policy/stats.safetensors"
TOKENIZER_DIR = "policy/tokenizer"
# what a tokenizer folder may hold; one of the first two is needed (AutoTokenizer reads the rest)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
NORM_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES")  # LeRobot's NormalizationMode names
FEATURE_TYPES = ("VISUAL", "STATE", "ACTION")
STATE_KEY, ACTION_KEY = "observation.state", "action"
LEROBOT_MAX_DIM = 32  # LeRobot's max_state_dim / max_action_dim: pi05's state is padded to it in the prompt
RTC_SCHEDULES = ("ZEROS", "ONES", "LINEAR", "EXP")  # LeRobot's RTCAttentionSchedule (= runtimes/rtc.py's)
RTC_FIELDS = ("enabled", "prefix_attention_schedule", "max_guidance_weight", "execution_horizon")
"""The RTCConfig fields a bundle keeps: the run-time defaults of real-time chunking (its debug
fields only drive LeRobot's debug tracker)."""


@dataclass(frozen=True)
class PolicyKind:
    """What one LeRobot policy type does beside its processor JSONs, declared by its recipe: its
    config.json `type`, its default normalization_mapping, the preprocessor steps (registry names)
    it saves — a compile without a folder builds its steps from these —, and what its model
    does to the inputs itself: whether the tokenizer puts a BOS first, where images are padded
    ("center" or "left_top"), how prompts pad when the tokenizer step does not say."""

    type: str
    normalization: Mapping[str, str]
    preprocessor: tuple[str, ...]
    bos: bool = True
    image_pad: str = "center"
    prompt_padding: str = "max_length"

    def variant_manifest(self, cfg: Any) -> dict[str, Any]:
        """`Recipe.variant_manifest`: the default policy entry of a compile without a folder."""
        return {"policy": default_policy(cfg, self)}


def default_policy(cfg: Any, kind: PolicyKind) -> dict[str, Any]:
    """The entry of a variant compile: cameras `observation.images.cam_<i>`, the compiled dims,
    every mode IDENTITY (there are no stats), no tokenizer, the kind's default steps."""
    state_dim = getattr(cfg, "state_dim", LEROBOT_MAX_DIM)  # pi05 takes no state tensor
    entry = {
        "type": kind.type,
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
    saved = {PROCESSORS[0]: [{"registry_name": n} for n in kind.preprocessor],
             PROCESSORS[1]: [{"registry_name": "unnormalizer_processor"}]}
    return entry | {"steps": policy_steps(saved, entry, kind, state_dim)}


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


def lerobot_policy(folder: Path, meta: Mapping[str, Any], cfg: Any, kind: PolicyKind, *,
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
    if meta.get("type", kind.type) != kind.type:
        raise WalkforgeError(f"{folder}: a LeRobot '{meta['type']}' folder, not {kind.type} (compile it with "
                             f"the {meta['type']} recipe)")
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
        "type": kind.type, "cameras": cameras, "image_resolution": resolution,
        "state": {"key": STATE_KEY, "dim": state}, "action": {"key": ACTION_KEY, "dim": action},
        "max_state_dim": max_state, "max_action_dim": max_action,
        "chunk_size": chunk, "n_action_steps": steps, "tokenizer_max_length": cfg.max_prompt_len,
        "normalization": normalization, "stats": STATS_FILE if stats else None, "tokenizer": None,
        "hub_tokenizer": _hub_tokenizer(found), "source": "lerobot",
        "lerobot": release.entry(),
        "processors": processors_entry,
        "relative_actions": relative_actions(found, action, state),
    }
    if STATE_PROMPT_STEP in kind.preprocessor:
        entry["prompt_state_dims"] = release.prompt_state_dims(state, max_state)
    if meta.get("rtc_config") is not None:
        entry["rtc_config"] = rtc_config(meta["rtc_config"])
    entry["steps"] = policy_steps(found, entry, kind, entry.get("prompt_state_dims", max_state))
    return entry, ({STATS_FILE: _stats_bytes(stats)} if stats else {})


# -- LeRobot's processor steps → the bundle's named steps (runtimes/processors/steps.py) ---------

NEWLINE_STEPS = ("pi0_new_line_processor", "smolvla_new_line_processor")
STATE_PROMPT_STEP = "pi05_prepare_state_tokenizer_processor_step"
# steps with nothing to do at inference here: batching and devices are the runtime's; the
# relative step only keeps the state for its absolute twin; a rename map renames robot keys into
# the feature names, which are what observations are keyed by here
PASSIVE_STEPS = ("rename_observations_processor", "to_batch_processor", "device_processor", *RELATIVE_STEPS)


def policy_steps(found: Mapping[str, list[dict[str, Any]]], entry: Mapping[str, Any],
                 kind: PolicyKind, prompt_dims: int) -> dict[str, list[dict[str, Any]]] | None:
    """The policy entry's `steps`: the processor JSONs' steps in their order, translated, with
    what the model does itself — cameras first, the state padded after normalising, the chunk
    cropped to the robot's action dim first. None for a model-only folder; a step walkforge
    cannot run is a compile error (ignoring it would change the actions)."""
    if not found:
        return None
    norm = entry["normalization"]
    cams = entry["cameras"]
    pre: list[dict[str, Any]] = [{"name": "cameras", "keys": [c["key"] for c in cams],
                                  "empty": [c["key"] for c in cams if c["empty"]],
                                  "resolution": list(entry["image_resolution"]), "pad": kind.image_pad}]
    pad = {"name": "pad_state", "dim": entry["max_state_dim"]}
    for step in found.get(PROCESSORS[0], []):
        name, config = step.get("registry_name"), step.get("config") or {}
        if name in NEWLINE_STEPS:
            pre.append({"name": "newline"})
        elif name == "tokenizer_processor":
            pre.append({"name": "tokenize", "max_length": entry["tokenizer_max_length"],
                        "padding": config.get("padding", kind.prompt_padding), "bos": kind.bos})
        elif name == "normalizer_processor":
            state = entry["state"]["key"]
            pre += [{"name": "normalize", "key": state, "mode": norm.get("STATE", "IDENTITY")}, pad]
        elif name == STATE_PROMPT_STEP:
            pre += [*([] if pad in pre else [pad]), {"name": "state_to_prompt", "dims": prompt_dims}]
        elif name not in PASSIVE_STEPS:
            raise _unknown_step(PROCESSORS[0], name)
    pre += [] if pad in pre else [pad]
    post: list[dict[str, Any]] = [{"name": "crop_actions", "dim": entry["action"]["dim"]}]
    for step in found.get(PROCESSORS[1], []):
        name = step.get("registry_name")
        if name == "unnormalizer_processor":
            post.append({"name": "unnormalize", "key": entry["action"]["key"],
                         "mode": norm.get("ACTION", "IDENTITY")})
        elif name == "absolute_actions_processor":
            relative = entry.get("relative_actions")
            post += [{"name": "absolute_actions", "mask": relative["mask"]}] if relative else []
        elif name not in PASSIVE_STEPS:
            raise _unknown_step(PROCESSORS[1], name)
    return {"pre": pre, "post": post}


def _unknown_step(file: str, name: Any) -> WalkforgeError:
    known = (*NEWLINE_STEPS, "tokenizer_processor", "normalizer_processor", STATE_PROMPT_STEP,
             "unnormalizer_processor", "absolute_actions_processor", *PASSIVE_STEPS)
    return WalkforgeError(f"{file}: step '{name}' is not one walkforge runs (it runs {', '.join(known)}); "
                          "its effect on the actions cannot be reproduced")


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


def rtc_config(rtc: Any) -> dict[str, Any]:
    """config.json's `rtc_config` (LeRobot's RTCConfig) as the policy entry keeps it: RTC_FIELDS
    where given, checked as LeRobot's RTCConfig checks them (the runtime checks them again)."""
    if not isinstance(rtc, Mapping):
        raise WalkforgeError(f"config.json rtc_config is {rtc!r}, not an object of RTCConfig fields")
    kept = {k: rtc[k] for k in RTC_FIELDS if k in rtc}
    schedule = str(kept.get("prefix_attention_schedule", "LINEAR"))
    weight = kept.get("max_guidance_weight", 10.0)
    horizon = kept.get("execution_horizon", 10)
    if schedule.upper() not in RTC_SCHEDULES:
        raise WalkforgeError(f"config.json rtc_config.prefix_attention_schedule is {schedule!r}, not one "
                             f"of {', '.join(RTC_SCHEDULES)}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
        raise WalkforgeError(f"config.json rtc_config.max_guidance_weight is {weight!r}: want a number > 0")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 0:
        raise WalkforgeError(f"config.json rtc_config.execution_horizon is {horizon!r}: want an integer ≥ 0")
    if not isinstance(kept.get("enabled", True), bool):
        raise WalkforgeError(f"config.json rtc_config.enabled is {kept['enabled']!r}: want true or false")
    return kept


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
                   kind: PolicyKind) -> dict[str, str]:
    """config.json's normalization_mapping (LeRobot's default for `kind` when absent); each
    (un)normalizer step's norm_map must agree with it."""
    mapping = {**kind.normalization, **(meta.get("normalization_mapping") or {})}
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


# -- the tensors of a LeRobot folder -----------------------------------------------------------

def shape(tensors: Mapping[str, torch.Tensor], key: str, kind: str = "pi0") -> tuple[int, ...]:
    """The shape of a tensor the folder must have; a missing one names the folder kind."""
    if key not in tensors:
        raise WalkforgeError(f"checkpoint is missing '{key}': not a LeRobot {kind} checkpoint?")
    return tuple(tensors[key].shape)


def depth(tensors: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many distinct first components the keys under `prefix` have (the layer count)."""
    return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})


def lerobot_weights(folder: Path, kind: str, marker: str) -> dict[str, torch.Tensor]:
    """model.safetensors (or its shards) and nothing else: the processor stats files beside it
    are not weights; `marker` is a key prefix every such model has. Keys get LeRobot's `model.`
    prefix where saved without it."""
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in read_weights(folder, "model").items():
        full = key if key.startswith("model.") else "model." + key
        if full in tensors:
            raise WalkforgeError(f"{folder}: '{key}' is saved both with and without the 'model.' prefix")
        tensors[full] = tensor
    if not any(k.startswith(marker) for k in tensors):
        raise WalkforgeError(f"{folder}/model.safetensors has no '{marker}*' tensors: "
                             f"not a LeRobot {kind} model")
    return tensors
