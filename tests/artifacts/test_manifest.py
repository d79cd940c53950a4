"""The typed manifest (artifacts/manifest.py): a compiled bundle's manifest round-trips through the
types byte for byte, a format-1 manifest upgrades to the documented defaults, and a format-1 bundle
loads and runs as before."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from bundles import private_copy
from click.testing import CliRunner

import walkforge
from walkforge.artifacts.bundle import MANIFEST, Bundle
from walkforge.artifacts.manifest import ABSENT, FORMAT_VERSION, Manifest, Policy, legacy_steps, upgrade
from walkforge.cli import cli
from walkforge.errors import WalkforgeError
from walkforge.recipes.inputs import example_inputs

COMPILES = {  # bundles other tests compile too (tests/bundles.py shares them)
    "vae": ("vae", {"variant": "tiny", "seed": 0}),
    "pi0-kv-fp8": ("pi0", {"variant": "tiny", "seed": 3, "gpu_archs": ("sm_90",), "kv_dtype": "fp8"}),
    "pi05": ("pi05", {"variant": "tiny", "seed": 3, "gpu_archs": ()}),
}
ADDED_AFTER_FORMAT_1 = ("front", "dim_ranges")  # top-level fields a format-1 bundle may lack (0.2)


def stored(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def as_format_1(manifest: dict) -> dict:
    """`manifest` as a 0.1 bundle wrote it: none of the fields later releases added."""
    old = copy.deepcopy(manifest)
    for key in ADDED_AFTER_FORMAT_1:
        old.pop(key, None)
    old["precision"].pop("int8_weight_max", None)
    for key in ("lerobot", "processors", "relative_actions", "prompt_state_dims", "steps"):
        old.get("policy", {}).pop(key, None)
    old["format_version"] = 1
    return old


@pytest.mark.parametrize("name", COMPILES)
def test_compiled_manifest_round_trips_exactly(compiled, name: str) -> None:
    recipe, fields = COMPILES[name]
    root = compiled(recipe, **fields)
    text = (root / MANIFEST).read_text()
    typed = Manifest.from_json(json.loads(text))
    assert typed.format_version == FORMAT_VERSION
    assert not typed.extra, f"undeclared top-level fields: {sorted(typed.extra)}"
    assert json.dumps(typed.to_json(), indent=2) == text  # what `inspect --json` prints, less digest/kind


def test_inspect_json_is_the_stored_manifest(compiled) -> None:
    root = compiled(*COMPILES["vae"][:1], **COMPILES["vae"][1])
    result = CliRunner().invoke(cli, ["inspect", str(root), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert (shown.pop("digest"), shown.pop("kind")) == (Bundle.open(root).digest, "full")
    assert json.dumps(shown, indent=2) == (root / MANIFEST).read_text()


def test_format_1_upgrades_to_the_documented_defaults(compiled) -> None:
    current = stored(compiled(*COMPILES["pi0-kv-fp8"][:1], **COMPILES["pi0-kv-fp8"][1]))
    int8 = copy.deepcopy(current)
    int8["precision"] |= {"weights": "int8", "activations": "int8"}
    int8["policy"] |= {"type": "pi05", "source": "lerobot", "max_state_dim": 32}
    typed = Manifest.from_json(as_format_1(int8))
    assert typed.format_version == 3
    assert typed.front == "pi0"  # 0.2: the recipe's name
    assert typed.dim_ranges == {}  # 0.2: no recipe ranges
    assert typed.precision.int8_weight_max == 127  # 0.3.2: full-range int8 weights
    policy = typed.policy
    assert policy.relative_actions is None  # 0.4.0: none before (null, as 0.4.0 writes it)
    assert policy.prompt_state_dims == 32 == policy.state_dims_in_prompt  # 0.4.0: all of max_state_dim
    assert policy.processors is ABSENT and policy.has_processors  # 0.4.0: absent = present
    assert policy.lerobot is None  # 0.4.0: not recorded
    assert typed.paging == Manifest.from_json(current).paging  # already there since 0.2


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_format_2_gets_the_steps_its_kind_ran_which_are_what_0_5_compiles(kind) -> None:
    """0.4.0 processed by kind; the steps `upgrade` writes for it must be the ones the compiler
    now builds for the same entry, else an old bundle would change its answers."""
    from walkforge.recipes import get_recipe

    recipe = get_recipe(kind)
    entry = recipe.variant_manifest(recipe.variant("tiny"))["policy"]
    old = {key: value for key, value in entry.items() if key != "steps"}
    assert legacy_steps(old) == entry["steps"]
    upgraded = upgrade({"format_version": 2, "policy": old})
    assert upgraded["format_version"] == 3 and upgraded["policy"]["steps"] == entry["steps"]
    model_only = upgrade({"format_version": 2, "policy": old | {"processors": None}})
    assert model_only["policy"]["steps"] is None


def test_format_1_fills_in_nothing_a_bundle_did_not_need(compiled) -> None:
    current = stored(compiled(*COMPILES["vae"][:1], **COMPILES["vae"][1]))
    upgraded = upgrade(as_format_1(current))
    assert upgraded == {**current, "front": "vae", "dim_ranges": {}} | {"format_version": 3}
    assert "int8_weight_max" not in upgraded["precision"] and "policy" not in upgraded


def test_current_format_is_not_copied_or_changed(compiled) -> None:
    current = stored(compiled(*COMPILES["vae"][:1], **COMPILES["vae"][1]))
    assert upgrade(current) == current


@pytest.mark.parametrize("name", ["vae", "pi0-kv-fp8"])
def test_format_1_bundle_loads_and_runs_as_before(compiled, tmp_path: Path, name: str) -> None:
    recipe, fields = COMPILES[name]
    original = compiled(recipe, **fields)
    old = private_copy(original, tmp_path / "old")
    (old / MANIFEST).write_text(json.dumps(as_format_1(stored(original)), indent=2))
    bundle = Bundle.open(old)
    assert bundle.stored["format_version"] == 1 and bundle.manifest["format_version"] == 3
    feeds = example_inputs(Bundle.open(original), seed=0)
    want = walkforge.load(original, spinning=False).run(feeds)
    got = walkforge.load(old, spinning=False).run(feeds)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_unknown_keys_are_kept_and_written_last(compiled) -> None:
    current = stored(compiled(*COMPILES["pi0-kv-fp8"][:1], **COMPILES["pi0-kv-fp8"][1]))
    current["later"] = {"x": 1}
    current["policy"] = {"later": True, **current["policy"]}
    typed = Manifest.from_json(current)
    assert typed.extra == {"later": {"x": 1}} and typed.policy.extra == {"later": True}
    out = typed.to_json()
    assert list(out)[-1] == "later" and list(out["policy"])[-1] == "later"


@pytest.mark.parametrize(("entry", "value", "message"), [
    ("policy", [], "policy is not an object"),
    ("weights", {"source": "random"}, "weights lacks 'fingerprint'"),
    ("files", {"a": 1}, r"files\.a is not an object"),
])
def test_malformed_sections_are_refused_naming_the_entry(tiny_bundle_copy: Path, entry: str, value: object,
                                                         message: str) -> None:
    manifest = stored(tiny_bundle_copy) | {entry: value}
    (tiny_bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(WalkforgeError, match=f"malformed manifest: {message}"):
        Bundle.open(tiny_bundle_copy, verify=False)


def test_policy_processors_absent_null_and_given() -> None:
    base = Manifest.from_json(stored_policy_manifest()).policy.to_json()
    assert Policy.from_json(base, "policy").has_processors  # absent: a variant bundle has them
    assert not Policy.from_json(base | {"processors": None}, "policy").has_processors  # model-only
    given = Policy.from_json(base | {"processors": {"files": ["a", "b"], "from": "folder"}}, "policy")
    assert given.has_processors and given.processors.from_ == "folder"
    assert given.to_json()["processors"] == {"files": ["a", "b"], "from": "folder"}


def stored_policy_manifest() -> dict:
    """A minimal current manifest with a variant pi0 policy."""
    from walkforge.recipes.lerobot import default_policy
    from walkforge.recipes.pi0.checkpoint import POLICY
    from walkforge.recipes.pi0.config import VARIANTS

    precision = {"weights": "fp32", "activations": "fp32", "kv": "fp32", "calibration": None}
    return {"walkforge_version": "0", "created": "", "precision": precision,
            "policy": default_policy(VARIANTS["tiny"], POLICY), "recipe": "pi0", "variant": "tiny",
            "config": {}, "weights": {"fingerprint": "", "source": "random"}, "front": "pi0",
            "dim_ranges": {}, "walks": {}, "plan": [], "targets": {}, "format": "walkforge-bundle",
            "format_version": FORMAT_VERSION, "files": {}}


@pytest.mark.parametrize("fields", [
    {"processors": {"files": ["pre.json", "post.json"], "from": "--processors"},
     "relative_actions": {"mask": [1.0, 0.0], "exclude_joints": [], "action_names": None},
     "prompt_state_dims": 8},
    {"processors": None, "relative_actions": None, "prompt_state_dims": 8},
])
def test_lerobot_policy_entry_round_trips_exactly(fields: dict) -> None:
    """The 0.4.0 and 0.5.0 fields as recipes/lerobot.py writes them (its key order), null apart
    from absent."""
    release = {"release": "0.4", "how": "read", "certain": True}
    lerobot = {"type": "pi05", "source": "lerobot", "lerobot": release}
    base = stored_policy_manifest()["policy"]
    steps = base.pop("steps")
    entry = base | lerobot | fields | {"steps": steps}  # 0.5.0's steps: written last
    assert json.dumps(Policy.from_json(entry, "policy").to_json()) == json.dumps(entry)
