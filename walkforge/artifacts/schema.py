"""The shape of a manifest as the runtime reads it: checked once when a bundle opens, so an edited or
damaged manifest is refused in one line naming the entry instead of failing deep in a front.

Checked: the walks' tensor contracts (`inputs`/`outputs` specs, `aliases`), the plan (walk names
and loops over a walk), every target's walk table (one engine file per walk), the sections read
as objects, the paging and KV-scale numbers, and the front's name. Paths are artifacts/paths.py's;
recipe configs are the recipe's own (`recipes.configs.from_dict`).

Bounds (`_bounds`): every section's present entries have their types and sane ranges, so a value
the runtime would trip over (a traceback) or size memory by (a hang, a huge allocation) is one
line here: fixed tensor dims and `dim_ranges` ≤ MAX_DIM; `paging` sizes (MAX_KV_TOKENS,
MAX_PAGE_SIZE, and the default page pool ≤ MAX_POOL_BYTES); `config` numbers finite, integers
within ±MAX_CONFIG_INT and `num_steps` in 1..MAX_STEPS; the `policy` and `vae` entries field by
field (POLICY_BOUNDS); the file table's sha256/size; precision, weights, targets, tokenizer and
kv_cache types. Absent entries are the typed reader's (artifacts/manifest.py) to refuse.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from walkforge.errors import WalkforgeError

OBJECT_SECTIONS = ("walks", "targets", "config", "weights", "precision", "dim_ranges", "vae", "paging")
"""Top-level entries that, where present, must be JSON objects."""


class Malformed(Exception):
    """One problem, `entry` first: turned into a WalkforgeError naming the manifest."""


def check_schema(manifest: Mapping[str, Any], where: str, schedules: Collection[str] | None = None) -> None:
    """Refuse (naming `where`, the manifest's path, and the entry) a manifest the runtime cannot
    read; `schedules`: the loop schedules this runtime knows (None: any name)."""
    try:
        _check(manifest, schedules)
    except Malformed as exc:
        raise WalkforgeError(f"{where}: malformed manifest: {exc}") from None


def _check(m: Mapping[str, Any], schedules: Collection[str] | None) -> None:
    for name in OBJECT_SECTIONS:
        if name in m:
            _object(m[name], name)
    for name in ("front", "recipe"):
        if name in m and not isinstance(m[name], str):
            raise Malformed(f"{name} is {_shown(m[name])}, not a name")
    walks = _object(m.get("walks"), "walks")
    if not walks:
        raise Malformed("walks is empty")
    for name, walk in walks.items():
        _walk(_object(walk, f"walks.{name}"), f"walks.{name}")
    for key, target in _object(m.get("targets"), "targets").items():
        table = _object(_object(target, f"targets.{key}").get("walks"), f"targets.{key}.walks")
        for walk in table:
            _known(walk, walks, f"targets.{key}.walks")
        if missing := sorted(set(walks) - set(table)):
            raise Malformed(f"targets.{key}.walks lacks walk {missing[0]!r}")
    _plan(m.get("plan"), walks, schedules)
    if "paging" in m:
        for key in ("max_tokens", "page_size"):
            _count(m["paging"].get(key), f"paging.{key}")
    if m.get("kv_cache") is not None:
        scales = _object(m["kv_cache"], "kv_cache").get("scales")
        if scales is not None and not (isinstance(scales, list) and all(map(_is_pair, scales))):
            raise Malformed(f"kv_cache.scales is {_shown(scales)}, not a [K, V] scale pair per layer")
    _bounds(m, walks)


def _walk(walk: Mapping[str, Any], entry: str) -> None:
    from walkforge.graphs.walk import DTYPES

    names = {}
    for side in ("inputs", "outputs"):
        specs = walk.get(side)
        if not isinstance(specs, list):
            raise Malformed(f"{entry}.{side} is {_shown(specs)}, not a list of tensors")
        for i, spec in enumerate(specs):
            at = f"{entry}.{side}[{i}]"
            spec = _object(spec, at)
            if not isinstance(spec.get("name"), str):
                raise Malformed(f"{at}.name is {_shown(spec.get('name'))}, not a name")
            if spec.get("dtype") not in DTYPES:
                raise Malformed(f"{at}.dtype is {_shown(spec.get('dtype'))}, not one of {', '.join(DTYPES)}")
            shape = spec.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, str) or _is_count(d, 0) for d in shape):
                raise Malformed(f"{at}.shape is {_shown(shape)}, not a list of sizes and dim names")
        names[side] = {spec["name"] for spec in specs}
    for out, inp in _object(walk.get("aliases", {}), f"{entry}.aliases").items():
        _known(out, names["outputs"], f"{entry}.aliases")
        _known(inp, names["inputs"], f"{entry}.aliases.{out}")


def _plan(plan: Any, walks: Mapping[str, Any], schedules: Collection[str] | None) -> None:
    if not isinstance(plan, list) or not plan:
        raise Malformed(f"plan is {_shown(plan)}, not a list of steps")
    for i, step in enumerate(plan):
        if isinstance(step, str):
            _known(step, walks, f"plan[{i}]")
            continue
        loop = _object(step, f"plan[{i}]")
        _known(loop.get("loop"), walks, f"plan[{i}].loop")
        if not isinstance(loop.get("count"), str):
            raise Malformed(f"plan[{i}].count is {_shown(loop.get('count'))}, not a setting name")
        schedule = loop.get("schedule")
        if schedule is not None and (not isinstance(schedule, str)
                                     or (schedules is not None and schedule not in schedules)):
            raise Malformed(f"plan[{i}].schedule is {_shown(schedule)}, not a known schedule")
        carry = _object(loop.get("carry"), f"plan[{i}].carry")
        if not carry or not all(isinstance(v, str) for v in carry.values()):
            raise Malformed(f"plan[{i}].carry is {_shown(carry)}, not a map of output to input names")


# -- bounds: types and sane ranges of every section the runtime reads ----------------------------

MAX_STEPS = 1000
"""Denoising steps, `config.num_steps` and `run --num-steps` alike (pi0 runs 10, BAGEL 50)."""
MAX_DIM = 1 << 24
"""A fixed tensor dim or a `dim_ranges` bound (the largest compiled, a vocabulary, is 257152)."""
MAX_RANK = 8
MAX_KV_TOKENS = 1 << 20
"""`paging.max_tokens`: KV tokens of one request."""
MAX_PAGE_SIZE = 1 << 12
"""`paging.page_size`: tokens per KV page (plugins/constants.py uses 16)."""
MAX_POOL_BYTES = 1 << 36
"""The default page pool (POOL_REQUESTS full-length requests) a bundle may ask for: 64 GiB."""
POOL_REQUESTS = 8
"""runtimes/chain.py DEFAULT_POOL_REQUESTS (tests/artifacts/test_bounds.py keeps them equal)."""
MAX_CONFIG_INT = (1 << 31) - 1
"""Any integer in `config` (token ids, vocabularies and widths are far below)."""
CONFIG_SIZES = {"num_steps": (1, MAX_STEPS), "num_views": (1, 64), "max_prompt_len": (1, 1 << 16),
                "action_horizon": (1, 4096), "action_dim": (1, 4096), "state_dim": (1, 4096),
                "max_latent_size": (1, 4096)}
"""`config` sizes the fronts allocate run-time arrays by, where a recipe has them: (least, most)."""
POLICY_TYPES = ("pi0", "pi05", "smolvla")
POLICY_SOURCES = ("lerobot", "variant")
NORM_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES")
"""recipes/lerobot.py NORM_MODES (tests/artifacts/test_bounds.py keeps them equal)."""
POLICY_BOUNDS = {"max_state_dim": (1, 4096), "max_action_dim": (1, 4096), "chunk_size": (1, 4096),
                 "tokenizer_max_length": (1, 1 << 16)}
"""`policy` integers: (least, most). Also: state/action dims 1..their max, n_action_steps
1..chunk_size, image sides 1..MAX_IMAGE_SIDE, 1..MAX_CAMERAS cameras, prompt_state_dims
0..max_state_dim."""
MAX_IMAGE_SIDE = 8192
MAX_CAMERAS = 64
MAX_SAMPLE_SIZE = 1 << 16
"""`vae.sample_size`, the tile side in pixels (at least the decoder's upscale)."""
MAX_LATENT_CHANNELS = 4096
MAX_FILE_SIZE = 1 << 50
_ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1, "float8_e4m3fn": 1}


def _bounds(m: Mapping[str, Any], walks: Mapping[str, Any]) -> None:
    for name in ("walkforge_version", "created", "format"):
        if name in m:
            _string(m[name], name)
    _optional(m, "variant", _string)
    for name, walk in walks.items():
        for side in ("inputs", "outputs"):
            for i, spec in enumerate(walk[side]):
                shape, at = spec["shape"], f"walks.{name}.{side}[{i}].shape"
                if len(shape) > MAX_RANK or any(isinstance(d, int) and d > MAX_DIM for d in shape):
                    raise Malformed(f"{at} is {_shown(shape)}, not at most {MAX_RANK} dims of at most "
                                    f"{MAX_DIM}")
    for name, limits in (m.get("dim_ranges") or {}).items():
        if not (isinstance(limits, list) and len(limits) == 3 and all(_is_count(v, 0) for v in limits)
                and limits[0] <= limits[1] <= limits[2] <= MAX_DIM):
            raise Malformed(f"dim_ranges.{name} is {_shown(limits)}, not [min, opt, max] with "
                            f"0 ≤ min ≤ opt ≤ max ≤ {MAX_DIM}")
    if "paging" in m:
        _paging(m["paging"], walks)
    if "config" in m:
        _config(m["config"])
    files = m.get("files") if isinstance(m.get("files"), Mapping) else {}
    if isinstance(m.get("policy"), Mapping):
        _policy(m["policy"], files)
    if m.get("vae") is not None:
        _vae(m["vae"], m.get("config"))
    if isinstance(m.get("precision"), Mapping):
        _precision(m["precision"])
    if isinstance(m.get("weights"), Mapping):
        _weights(m["weights"])
    for key, target in (m.get("targets") or {}).items():
        _target(target, f"targets.{key}")
    if isinstance(m.get("tokenizer"), Mapping):
        _string(m["tokenizer"].get("file"), "tokenizer.file")
    if isinstance(m.get("kv_cache"), Mapping):
        _kv_cache(m["kv_cache"])
    if isinstance(m.get("files"), Mapping):
        for rel, entry in m["files"].items():
            if isinstance(entry, Mapping):
                _file_entry(entry, f"files[{rel!r}]")


def _paging(paging: Mapping[str, Any], walks: Mapping[str, Any]) -> None:
    tokens = _int_in(paging.get("max_tokens"), 1, MAX_KV_TOKENS, "paging.max_tokens")
    page = _int_in(paging.get("page_size"), 1, MAX_PAGE_SIZE, "paging.page_size")
    pages = POOL_REQUESTS * -(-tokens // page)
    for walk in walks.values():
        for pool in (walk.get("aliases") or {}).values():
            spec = next(s for s in walk["inputs"] if s["name"] == pool)
            fixed = math.prod(d for d in spec["shape"] if isinstance(d, int))
            size = fixed * pages * _ITEMSIZE[spec["dtype"]]
            if size > MAX_POOL_BYTES:
                raise Malformed(f"paging.max_tokens is {tokens}: its default page pool {pool!r} would take "
                                f"{size / 2**30:.0f} GiB, over {MAX_POOL_BYTES >> 30} GiB")


def _config(config: Any) -> None:
    config = _object(config, "config")
    stack: list[tuple[str, Any]] = [("config", config)]
    while stack:  # no recursion: a deep config must not exhaust the stack
        at, value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend((f"{at}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{at}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise Malformed(f"{at} is {value!r}, not a finite number")
        elif _is_number(value) and isinstance(value, int) and abs(value) > MAX_CONFIG_INT:
            raise Malformed(f"{at} is {_shown(value)}, beyond ±{MAX_CONFIG_INT}")
    for key, (least, most) in CONFIG_SIZES.items():
        if key in config:
            _int_in(config[key], least, most, f"config.{key}")


MAX_STEPS_PER_LIST = 64
"""`policy.steps.pre` / `.post`: named processing steps (LeRobot's pipelines have about ten)."""


def _steps(steps: Mapping[str, Any]) -> None:
    """Each list a list of objects with a string `name` (which names it runs: the runtime's
    steps table, refused there with the known ones)."""
    for side in ("pre", "post"):
        entries = steps.get(side)
        if not (isinstance(entries, list) and len(entries) <= MAX_STEPS_PER_LIST):
            raise Malformed(f"policy.steps.{side} is {_shown(entries)}, not a list of at most "
                            f"{MAX_STEPS_PER_LIST} steps")
        for i, step in enumerate(entries):
            _string(_object(step, f"policy.steps.{side}[{i}]").get("name"), f"policy.steps.{side}[{i}].name")


def _policy(p: Mapping[str, Any], files: Mapping[str, Any]) -> None:
    if "type" in p:
        _one_of(p["type"], POLICY_TYPES, "policy.type")
    if "source" in p:
        _one_of(p["source"], POLICY_SOURCES, "policy.source")
    if "cameras" in p:
        cameras = p["cameras"]
        if not isinstance(cameras, list) or not 1 <= len(cameras) <= MAX_CAMERAS:
            raise Malformed(f"policy.cameras is {_shown(cameras)}, not a list of 1..{MAX_CAMERAS} cameras")
        keys = set()
        for i, camera in enumerate(cameras):
            camera = _object(camera, f"policy.cameras[{i}]")
            key = _string(camera.get("key"), f"policy.cameras[{i}].key")
            if not isinstance(camera.get("empty"), bool):
                raise Malformed(f"policy.cameras[{i}].empty is {_shown(camera.get('empty'))}, "
                                "not true or false")
            if key in keys:
                raise Malformed(f"policy.cameras[{i}].key {key!r} is named twice")
            keys.add(key)
    if "image_resolution" in p:
        side = p["image_resolution"]
        if not (isinstance(side, list) and len(side) == 2 and all(_is_count(v, 1) and v <= MAX_IMAGE_SIDE
                                                                  for v in side)):
            raise Malformed(f"policy.image_resolution is {_shown(side)}, not [height, width] in "
                            f"1..{MAX_IMAGE_SIDE}")
    for key, (least, most) in POLICY_BOUNDS.items():
        if key in p:
            _int_in(p[key], least, most, f"policy.{key}")
    for name in ("state", "action"):
        if name in p:
            feature = _object(p[name], f"policy.{name}")
            _string(feature.get("key"), f"policy.{name}.key")
            most = p.get(f"max_{name}_dim")
            most = most if _is_count(most, 1) else POLICY_BOUNDS[f"max_{name}_dim"][1]
            _int_in(feature.get("dim"), 1, most, f"policy.{name}.dim")
    if "n_action_steps" in p:
        chunk = p.get("chunk_size")
        _int_in(p["n_action_steps"], 1, chunk if _is_count(chunk, 1) else POLICY_BOUNDS["chunk_size"][1],
                "policy.n_action_steps")
    if p.get("prompt_state_dims") is not None:
        most = p.get("max_state_dim")
        _int_in(p["prompt_state_dims"], 0, most if _is_count(most, 1) else POLICY_BOUNDS["max_state_dim"][1],
                "policy.prompt_state_dims")
    if "normalization" in p:
        for kind, mode in _object(p["normalization"], "policy.normalization").items():
            _one_of(mode, NORM_MODES, f"policy.normalization.{kind}")
    for name in ("stats", "hub_tokenizer"):
        _optional(p, name, _string, prefix="policy")
    if p.get("stats") is not None:
        _listed(p["stats"], files, "policy.stats")
    if p.get("tokenizer") is not None:
        tokenizer = _object(p["tokenizer"], "policy.tokenizer")
        folder = _string(tokenizer.get("dir"), "policy.tokenizer.dir")
        names = tokenizer.get("files")
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
            raise Malformed(f"policy.tokenizer.files is {_shown(names)}, not a list of file names")
        for name in names:
            _listed(f"{folder}/{name}", files, "policy.tokenizer.files")
    if p.get("processors") is not None:
        processors = _object(p["processors"], "policy.processors")
        names = processors.get("files")
        if "files" in processors and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise Malformed(f"policy.processors.files is {_shown(names)}, not a list of file names")
        _optional(processors, "from", _string, prefix="policy.processors")
    if p.get("steps") is not None:
        _steps(_object(p["steps"], "policy.steps"))
    if p.get("relative_actions") is not None:
        mask = _object(p["relative_actions"], "policy.relative_actions").get("mask")
        if "mask" in p["relative_actions"] and not (
                isinstance(mask, list) and len(mask) <= POLICY_BOUNDS["max_action_dim"][1]
                and all(isinstance(v, bool) or _is_finite(v) for v in mask)):
            raise Malformed(f"policy.relative_actions.mask is {_shown(mask)}, not a list of 0/1 per "
                            "action dim")
    if p.get("lerobot") is not None:
        _object(p["lerobot"], "policy.lerobot")


def _vae(vae: Any, config: Any) -> None:
    vae = _object(vae, "vae")
    if "scaling_factor" in vae:
        _finite(vae["scaling_factor"], "vae.scaling_factor", positive=True)
    if vae.get("shift_factor") is not None:
        _finite(vae["shift_factor"], "vae.shift_factor")
    channels = config.get("latent_channels") if isinstance(config, Mapping) else None
    for key in ("latents_mean", "latents_std"):
        values = vae.get(key)
        if values is None:
            continue
        if not (isinstance(values, list) and 1 <= len(values) <= MAX_LATENT_CHANNELS
                and all(_is_finite(v) and (key == "latents_mean" or v > 0) for v in values)):
            raise Malformed(f"vae.{key} is {_shown(values)}, not a list of finite "
                            f"{'numbers' if key == 'latents_mean' else 'positive numbers'}")
        if _is_count(channels, 1) and len(values) != channels:
            raise Malformed(f"vae.{key} has {len(values)} values, config.latent_channels is {channels}")
    if vae.get("force_upcast") is not None and not isinstance(vae["force_upcast"], bool):
        raise Malformed(f"vae.force_upcast is {_shown(vae['force_upcast'])}, not true or false")
    if "sample_size" in vae:
        blocks = config.get("block_out_channels") if isinstance(config, Mapping) else None
        least = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and 1 <= len(blocks) <= 16 else 1
        size = vae["sample_size"]
        sides = size if isinstance(size, list) and 1 <= len(size) <= 2 else [size]
        if not all(_is_count(v, least) and v <= MAX_SAMPLE_SIZE for v in sides):
            raise Malformed(f"vae.sample_size is {_shown(size)}, not a side in {least}..{MAX_SAMPLE_SIZE} "
                            "pixels")


def _precision(precision: Mapping[str, Any]) -> None:
    for key in ("weights", "activations", "kv"):
        if key in precision:
            _string(precision[key], f"precision.{key}")
    if precision.get("int8_weight_max") is not None:
        _one_of(precision["int8_weight_max"], (63, 127), "precision.int8_weight_max")


def _weights(weights: Mapping[str, Any]) -> None:
    for key in ("fingerprint", "source"):
        if key in weights:
            _string(weights[key], f"weights.{key}")
    for key in ("file", "path"):
        _optional(weights, key, _string, prefix="weights")
    for key in ("seed", "parameters"):
        if weights.get(key) is not None:
            _int_in(weights[key], 0, 1 << 63, f"weights.{key}")
    if weights.get("reference") is not None and not isinstance(weights["reference"], bool):
        raise Malformed(f"weights.reference is {_shown(weights['reference'])}, not true or false")


def _target(target: Mapping[str, Any], entry: str) -> None:
    if "backend" in target:
        _string(target["backend"], f"{entry}.backend")
    for key in ("provider", "gpu", "compute_capability", "timing_cache", "build_log"):
        _optional(target, key, _string, prefix=entry)
    if "versions" in target:
        _object(target["versions"], f"{entry}.versions")
    for walk, rel in target["walks"].items():
        _string(rel, f"{entry}.walks.{walk}")


def _kv_cache(kv: Mapping[str, Any]) -> None:
    if "dtype" in kv:
        _string(kv["dtype"], "kv_cache.dtype")
    for key, positive in (("scales", True), ("amax", False)):
        pairs = kv.get(key)
        if pairs is not None and not (isinstance(pairs, list) and all(
                _is_pair(pair) and all(_is_finite(v) and (v > 0 if positive else v >= 0) for v in pair)
                for pair in pairs)):
            raise Malformed(f"kv_cache.{key} is {_shown(pairs)}, not a [K, V] pair of finite "
                            f"{'positive ' if positive else ''}numbers per layer")
    if kv.get("samples") is not None:
        _int_in(kv["samples"], 0, MAX_CONFIG_INT, "kv_cache.samples")


def _file_entry(entry: Mapping[str, Any], at: str) -> None:
    digest = entry.get("sha256")
    if "sha256" in entry and not (isinstance(digest, str) and len(digest) == 64
                                  and all(c in "0123456789abcdef" for c in digest)):
        raise Malformed(f"{at}.sha256 is {_shown(digest)}, not 64 lowercase hex digits")
    if "size" in entry:
        _int_in(entry["size"], 0, MAX_FILE_SIZE, f"{at}.size")


def _listed(rel: str, files: Mapping[str, Any], entry: str) -> None:
    """A file the runtime reads later must be in the files table (checked, when the bundle has one,
    against its sha256: `Bundle.read_verified`)."""
    if files and rel not in files:
        raise Malformed(f"{entry} names {_shown(rel)}, which the files table does not list")


def _int_in(value: Any, least: int, most: int, entry: str) -> int:
    if not (_is_count(value, least) and value <= most):
        raise Malformed(f"{entry} is {_shown(value)}, not an integer in {least}..{most}")
    return value


def _finite(value: Any, entry: str, positive: bool = False) -> None:
    if not (_is_finite(value) and (value > 0 or not positive)):
        raise Malformed(f"{entry} is {_shown(value)}, not a finite{' positive' if positive else ''} number")


def _string(value: Any, entry: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{entry} is {_shown(value)}, not a string")
    return value


def _optional(section: Mapping[str, Any], key: str, check: Any, prefix: str = "") -> None:
    """`check` the entry `key` of `section` unless it is absent or null."""
    if section.get(key) is not None:
        check(section[key], f"{prefix}.{key}" if prefix else key)


def _one_of(value: Any, allowed: tuple, entry: str) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise Malformed(f"{entry} is {_shown(value)}, not one of {', '.join(map(str, allowed))}")


def _object(value: Any, entry: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise Malformed(f"{entry} is {_shown(value)}, not an object")
    return value


def _known(name: Any, known: Collection[str], entry: str) -> None:
    if not isinstance(name, str) or name not in known:
        raise Malformed(f"{entry} names {_shown(name)}, not one of {', '.join(sorted(known))}")


def _count(value: Any, entry: str) -> None:
    if not _is_count(value, 1):
        raise Malformed(f"{entry} is {_shown(value)}, not a positive integer")


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number other than NaN and ±Infinity (which Python's json reads), however large an int."""
    return _is_number(value) and (isinstance(value, int) or math.isfinite(value))


def _shown(value: Any) -> str:
    """A short one-line rendering of a manifest value."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
