"""#32 (11, 17): every manifest section the runtime reads is bounded (artifacts/schema.py `_bounds`),
so a bad value is a one-line `malformed manifest` instead of a traceback, a hang or a huge
allocation; manifest.json itself is capped (MANIFEST_MAX_BYTES, by stat before reading), nested at
most MANIFEST_MAX_DEPTH deep, and its paths are checked without a system call per path."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from walkforge.artifacts import bundle as bundle_module
from walkforge.artifacts import paths as paths_module
from walkforge.artifacts import schema
from walkforge.artifacts.bundle import MANIFEST, MANIFEST_MAX_BYTES, MANIFEST_MAX_DEPTH, Bundle
from walkforge.artifacts.schema import check_schema
from walkforge.errors import WalkforgeError

POLICY = {  # pi0's real sizes, as a LeRobot compile writes them
    "type": "pi0",
    "cameras": [{"key": "observation.images.base", "empty": False}, {"key": "observation.images.wrist",
                                                                      "empty": False},
                {"key": "observation.images.empty_camera_0", "empty": True}],
    "image_resolution": [224, 224], "state": {"key": "observation.state", "dim": 14},
    "action": {"key": "action", "dim": 14}, "max_state_dim": 32, "max_action_dim": 32, "chunk_size": 50,
    "n_action_steps": 50, "tokenizer_max_length": 48,
    "normalization": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    "stats": "policy/stats.safetensors",
    "tokenizer": {"dir": "policy/tokenizer", "files": ["tokenizer.json", "tokenizer_config.json"]},
    "hub_tokenizer": "google/paligemma-3b-pt-224", "source": "lerobot",
    "lerobot": {"release": "0.4", "how": "read", "certain": True}, "processors": None,
    "relative_actions": {"mask": [True] * 13 + [False]}, "prompt_state_dims": None,
}
VAE = {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
       "force_upcast": True, "sample_size": 512}
POOL = {"name": "kv_pool", "dtype": "float32", "shape": [18, 2, "num_pages", 16, 1, 256]}


@pytest.fixture(scope="module")
def good(tiny_bundle: Path) -> dict:
    """The tiny VAE's manifest with every bounded section added at realistic sizes: it passes."""
    m = json.loads((tiny_bundle / MANIFEST).read_text())
    m["policy"] = copy.deepcopy(POLICY)
    m["vae"] = dict(VAE)
    m["config"] = {**m["config"], "num_steps": 10}
    m["paging"] = {"max_tokens": 816, "page_size": 16}
    walk = m["walks"]["decode"]
    walk["inputs"].append(POOL)
    walk["outputs"].append({**POOL, "name": "kv_pool_out"})
    walk["aliases"] = {"kv_pool_out": "kv_pool"}
    m["kv_cache"] = {"dtype": "float8_e4m3fn", "scales": [[0.01, 0.02]] * 18, "amax": [[2.0, 3.0]] * 18}
    for rel in ("policy/stats.safetensors", "policy/tokenizer/tokenizer.json",
                "policy/tokenizer/tokenizer_config.json"):
        m["files"][rel] = {"sha256": "0" * 64, "size": 1}
    check_schema(m, "good/manifest.json")
    return m


def put(manifest: dict, entry: str, value: object) -> dict:
    """A copy of `manifest` with the dotted `entry` (list indices as numbers) set to `value`."""
    m = copy.deepcopy(manifest)
    *keys, last = [int(k) if k.isdigit() else k for k in entry.split(".")]
    holder = m
    for key in keys:
        holder = holder[key]
    holder[last] = value
    return m


CASES = [  # (entry, value, what the one-line error says after "malformed manifest: ")
    ("config.num_steps", 10**9, "config.num_steps is 1000000000, not an integer in 1..1000"),
    ("config.num_steps", 0, "config.num_steps is 0, not an integer in 1..1000"),
    ("config.num_steps", 1e9, "config.num_steps is 1000000000.0, not an integer in 1..1000"),
    ("config.num_views", 10**6, "config.num_views is 1000000, not an integer in 1..64"),
    ("config.layers_per_block", 10**12, "config.layers_per_block is 1000000000000, beyond ±2147483647"),
    ("config.eps", float("nan"), "config.eps is nan, not a finite number"),
    ("paging.max_tokens", 10**12, "paging.max_tokens is 1000000000000, not an integer in 1..1048576"),
    ("paging.max_tokens", 1 << 20, "its default page pool 'kv_pool' would take 288 GiB, over 64 GiB"),
    ("paging.page_size", 10**6, "paging.page_size is 1000000, not an integer in 1..4096"),
    ("walks.decode.inputs.0.shape", ["batch", 4, 10**9, "width"], "walks.decode.inputs[0].shape is"),
    ("dim_ranges.height", [8, 4, 2], "dim_ranges.height is [8, 4, 2], not [min, opt, max]"),
    ("dim_ranges.width", [1, 1, 10**9], "dim_ranges.width is [1, 1, 1000000000], not [min, opt, max]"),
    ("policy.type", "pi7", "policy.type is 'pi7', not one of pi0, pi05"),
    ("policy.cameras", [], "policy.cameras is [], not a list of 1..64 cameras"),
    ("policy.cameras.1.key", "observation.images.base",
     "policy.cameras[1].key 'observation.images.base' is named twice"),
    ("policy.cameras.0.empty", "no", "policy.cameras[0].empty is 'no', not true or false"),
    ("policy.image_resolution", [0, 224],
     "policy.image_resolution is [0, 224], not [height, width] in 1..8192"),
    ("policy.image_resolution", [10**6, 224], "policy.image_resolution is [1000000, 224]"),
    ("policy.state.dim", "14", "policy.state.dim is '14', not an integer in 1..32"),
    ("policy.action.dim", 33, "policy.action.dim is 33, not an integer in 1..32"),
    ("policy.max_action_dim", 10**9, "policy.max_action_dim is 1000000000, not an integer in 1..4096"),
    ("policy.chunk_size", 10**9, "policy.chunk_size is 1000000000, not an integer in 1..4096"),
    ("policy.n_action_steps", 51, "policy.n_action_steps is 51, not an integer in 1..50"),
    ("policy.tokenizer_max_length", -1, "policy.tokenizer_max_length is -1, not an integer in 1..65536"),
    ("policy.normalization.STATE", "ZSCORE", "policy.normalization.STATE is 'ZSCORE', not one of IDENTITY"),
    ("policy.stats", 7, "policy.stats is 7, not a string"),
    ("policy.stats", "policy/other.safetensors", "policy.stats names 'policy/other.safetensors', which the "
                                                 "files table does not list"),
    ("policy.tokenizer.files", "tokenizer.json", "policy.tokenizer.files is 'tokenizer.json', not a list"),
    ("policy.tokenizer.files", ["tokenizer.model"],
     "policy.tokenizer.files names 'policy/tokenizer/tokenizer.model'"),
    ("policy.source", "hub", "policy.source is 'hub', not one of lerobot, variant"),
    ("policy.prompt_state_dims", 33, "policy.prompt_state_dims is 33, not an integer in 0..32"),
    ("policy.relative_actions.mask", ["x"], "policy.relative_actions.mask is ['x'], not a list of 0/1"),
    ("policy.steps", {"pre": [{"name": "newline"}], "post": "x"}, "policy.steps.post is 'x', not a list"),
    ("policy.steps", {"pre": [{"dims": 3}], "post": []}, "policy.steps.pre[0].name"),
    ("vae.scaling_factor", 0, "vae.scaling_factor is 0, not a finite positive number"),
    ("vae.scaling_factor", float("inf"), "vae.scaling_factor is inf, not a finite positive number"),
    ("vae.shift_factor", "0.1", "vae.shift_factor is '0.1', not a finite number"),
    ("vae.latents_mean", [0.0] * 3, "vae.latents_mean has 3 values, config.latent_channels is 4"),
    ("vae.latents_std", [1.0, 1.0, 0.0, 1.0],
     "vae.latents_std is [1.0, 1.0, 0.0, 1.0], not a list of finite"),
    ("vae.force_upcast", "yes", "vae.force_upcast is 'yes', not true or false"),
    ("vae.sample_size", 1, "vae.sample_size is 1, not a side in 2..65536 pixels"),
    ("vae.sample_size", 10**9, "vae.sample_size is 1000000000, not a side in 2..65536 pixels"),
    ("precision.int8_weight_max", 255, "precision.int8_weight_max is 255, not one of 63, 127"),
    ("weights.seed", "0", "weights.seed is '0', not an integer"),
    ("targets.cpu.backend", 3, "targets.cpu.backend is 3, not a string"),
    ("kv_cache.scales", [[0.0, 1.0]],
     "kv_cache.scales is [[0.0, 1.0]], not a [K, V] pair of finite positive"),
    ("kv_cache.amax", [[float("nan"), 1.0]], "kv_cache.amax is [[nan, 1.0]], not a [K, V] pair"),
    ("files.walks/decode.onnx.sha256", "xyz",
     "files['walks/decode.onnx'].sha256 is 'xyz', not 64 lowercase hex"),
    ("files.walks/decode.onnx.size", -1, "files['walks/decode.onnx'].size is -1, not an integer in 0.."),
]


@pytest.mark.parametrize(("entry", "value", "message"), CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_out_of_bounds_entries_are_one_line_errors(good: dict, entry: str, value: object,
                                                   message: str) -> None:
    if entry.startswith("files."):  # the key holds dots: files.<rel>.<field>
        rel, field = entry[len("files."):].rsplit(".", 1)
        bad = copy.deepcopy(good)
        bad["files"][rel][field] = value
    else:
        bad = put(good, entry, value)
    with pytest.raises(WalkforgeError) as info:
        check_schema(bad, "b/manifest.json")
    line = str(info.value)
    assert "\n" not in line and line.startswith("b/manifest.json: malformed manifest: ")
    assert message in line, line


def test_real_sizes_pass(good: dict) -> None:
    """Sizes of the real models, at the edges of each bound, pass."""
    for entry, value in [("config.num_steps", schema.MAX_STEPS), ("config.vocab", 257152),
                         ("paging.max_tokens", 4096 + 80), ("policy.n_action_steps", 1),
                         ("policy.prompt_state_dims", 0), ("vae.sample_size", [1024, 1024]),
                         ("vae.latents_mean", [0.1] * 4), ("vae.latents_std", [0.5] * 4),
                         ("vae.shift_factor", 0.1159), ("policy.tokenizer", None), ("policy.stats", None)]:
        check_schema(put(good, entry, value), "ok/manifest.json")


def test_staged_manifest_without_files_table_is_not_held_to_it(good: dict) -> None:
    """The compiler checks a staged bundle before its files table exists."""
    check_schema({k: v for k, v in good.items() if k != "files"}, "staged/manifest.json")


def test_bounded_through_bundle_open_and_load(tiny_bundle_copy: Path) -> None:
    """The 0.3.4 probe: `config.num_steps = 1e9` never returned; now every reader refuses it at once."""
    m = json.loads((tiny_bundle_copy / MANIFEST).read_text())
    m["config"]["num_steps"] = 10**9
    (tiny_bundle_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(WalkforgeError, match="malformed manifest: config.num_steps is 1000000000"):
        Bundle.open(tiny_bundle_copy, verify=False)


def test_constants_match_their_sources() -> None:
    from walkforge.recipes.lerobot import NORM_MODES
    from walkforge.runtimes.kv_pool import DEFAULT_POOL_REQUESTS

    assert schema.NORM_MODES == NORM_MODES
    assert schema.POOL_REQUESTS == DEFAULT_POOL_REQUESTS


def test_manifest_over_the_cap_is_refused_before_it_is_read(tiny_bundle_copy: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert MANIFEST_MAX_BYTES == 16 << 20
    path = tiny_bundle_copy / MANIFEST
    m = json.loads(path.read_text())
    m["padding"] = ""
    m["padding"] = "x" * (MANIFEST_MAX_BYTES + 1 - len(json.dumps(m)))
    path.write_text(json.dumps(m))
    assert path.stat().st_size == MANIFEST_MAX_BYTES + 1

    def parsed(*_args, **_kwargs):
        raise AssertionError("an oversized manifest was parsed")

    monkeypatch.setattr(bundle_module.json, "loads", parsed)
    with pytest.raises(WalkforgeError, match=f"{MANIFEST}: the manifest is {MANIFEST_MAX_BYTES + 1} bytes, "
                                             "over the 16 MiB a manifest may be; refused"):
        Bundle.open(tiny_bundle_copy)


def test_manifest_nested_too_deep_is_refused(tiny_bundle_copy: Path) -> None:
    path = tiny_bundle_copy / MANIFEST
    m = json.loads(path.read_text())
    deep: object = 1
    for _ in range(MANIFEST_MAX_DEPTH + 1):
        deep = [deep]
    m["stages"] = deep
    path.write_text(json.dumps(m))
    with pytest.raises(WalkforgeError, match=f"malformed manifest: nested deeper than {MANIFEST_MAX_DEPTH}"):
        Bundle.open(tiny_bundle_copy)


def test_many_paths_are_checked_without_a_system_call_each(tiny_bundle_copy: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """#32 (17): 0.3.4 resolved every path the manifest names on its own (realpath: an lstat per
    part); a 100 MB manifest took 113 s. Paths under one folder now cost one listing of it."""
    manifest = json.loads((tiny_bundle_copy / MANIFEST).read_text())
    manifest["check"] = {f"k{i}": {"file": f"notes/n{i % 10}/f{i}.txt"} for i in range(20_000)}
    calls = {"lstat": 0, "scandir": 0}
    lstat, scandir = os.lstat, os.scandir

    def counted_lstat(*args, **kwargs):
        calls["lstat"] += 1
        return lstat(*args, **kwargs)

    def counted_scandir(*args, **kwargs):
        calls["scandir"] += 1
        return scandir(*args, **kwargs)

    monkeypatch.setattr(paths_module.os, "lstat", counted_lstat)
    monkeypatch.setattr(paths_module.os, "scandir", counted_scandir)
    paths_module.check_paths(tiny_bundle_copy, manifest)
    assert calls["scandir"] <= 20 and calls["lstat"] <= 50, calls
    manifest["check"]["k7"]["file"] = "notes/../../outside.txt"
    with pytest.raises(WalkforgeError, match=r"check\.k7\.file = 'notes/\.\./\.\./outside\.txt' leaves"):
        paths_module.check_paths(tiny_bundle_copy, manifest)


def test_a_symlinked_folder_out_of_the_bundle_is_still_refused(tiny_bundle_copy: Path,
                                                               tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tiny_bundle_copy / "notes").symlink_to(outside)
    manifest = json.loads((tiny_bundle_copy / MANIFEST).read_text())
    manifest["check"] = {"a": {"file": "notes/x.txt"}, "b": {"file": "notes/y.txt"}}
    with pytest.raises(WalkforgeError, match=r"check\.a\.file = 'notes/x\.txt' resolves outside the bundle"):
        paths_module.check_paths(tiny_bundle_copy, manifest)
