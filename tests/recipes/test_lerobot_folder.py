"""LeRobot pi0 / pi05 folders as published (tests/lerobot_folder.py writes them): every field
read into the config and the manifest's "policy" entry, the stats and tokenizer files bundled,
and each bad folder a one-line error naming the field and both values."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lerobot_folder import EMBED, LM_HEAD, PRE, write_folder
from safetensors.torch import load_file, save_file

from walkforge import CompileRequest, compile_bundle
from walkforge.artifacts.manifest import legacy_steps
from walkforge.cli import cli
from walkforge.compiler.pipeline import write_extra_files
from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.recipes.blocks.gemma import GemmaConfig
from walkforge.recipes.lerobot import bundle_tokenizer
from walkforge.recipes.weights import load_strict

KINDS = ("pi0", "pi05")
PRE_STATS = {"pi0": "policy_preprocessor_step_5_normalizer_processor.safetensors",
             "pi05": "policy_preprocessor_step_2_normalizer_processor.safetensors"}
POST_STATS = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
# head size 12: no multiple of 256 and no known variant's, so only --config can name the split
ODD_HEADS = {"llm": {"heads": 4}, "expert": {"head_dim": 12}}


def odd_cfg(kind: str):
    tiny = get_recipe(kind).variant("tiny")
    return replace(tiny, llm=GemmaConfig(width=64, layers=2, heads=4, kv_heads=1, head_dim=12, mlp=128,
                                         vocab=1000), expert=replace(tiny.expert, head_dim=12))


def read(path: Path, kind: str, overrides: dict | None = None):
    return get_recipe(kind).read_checkpoint(path, overrides or {})


def one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value), str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_is_read(kind: str, tmp_path: Path) -> None:
    f = write_folder(tmp_path, kind, state_dim=7, action_dim=6)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta |= {"num_inference_steps": 7, "n_action_steps": 20}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    got = read(tmp_path, kind)
    cfg, tensors = got
    assert cfg == replace(f.cfg, num_steps=7) and cfg.num_views == 3
    policy = dict(got.manifest["policy"])
    steps = policy.pop("steps")
    assert steps == legacy_steps(policy)  # what 0.4.0 ran for this entry, as steps
    mode = "MEAN_STD" if kind == "pi0" else "QUANTILES"
    assert policy == {
        "type": kind,
        "cameras": [{"key": "observation.images.base", "empty": False},
                    {"key": "observation.images.wrist", "empty": False},
                    {"key": "observation.images.empty_camera_0", "empty": True}],
        "image_resolution": [224, 224], "state": {"key": "observation.state", "dim": 7},
        "action": {"key": "action", "dim": 6}, "max_state_dim": 32, "max_action_dim": 32,
        "chunk_size": 50, "n_action_steps": 20, "tokenizer_max_length": cfg.max_prompt_len,
        "normalization": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode},
        "stats": "policy/stats.safetensors", "tokenizer": None,
        "hub_tokenizer": "google/paligemma-3b-pt-224", "source": "lerobot",
        "lerobot": {"release": "0.4", "certain": True,
                    "how": "read from the folder: model.safetensors holds the tied lm_head without "
                           "embed_tokens (0.4.x)"},
        "processors": {"files": ["policy_preprocessor.json", "policy_postprocessor.json"], "from": "folder"},
        "relative_actions": None,
    } | ({"prompt_state_dims": 32} if kind == "pi05" else {})  # 0.4.x writes all 32 padded dims
    stats = load_file_bytes(got.files["policy/stats.safetensors"])
    assert set(stats) == set(f.stats) and all(torch.equal(stats[k], f.stats[k]) for k in f.stats)
    assert all(t.dtype == torch.float32 for t in stats.values())
    # the stats files are not weights: every tensor read is the model's, the tied embed included
    counts = load_strict(get_recipe(kind).build(cfg), tensors, get_recipe(kind).key_map)
    assert counts == {"loaded": len(f.tensors) + 1 - 1, "ignored": 1}
    assert torch.equal(tensors[EMBED], f.tensors[LM_HEAD])


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_empty_cameras_count_without_being_listed(tmp_path: Path) -> None:
    write_folder(tmp_path, "pi0", cameras=("top",), empty_cameras=2)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["input_features"] = {k: v for k, v in meta["input_features"].items() if "empty" not in k}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    got = read(tmp_path, "pi0")
    assert got[0].num_views == 3
    assert [c["key"].split(".")[-1] for c in got.manifest["policy"]["cameras"]] == [
        "top", "empty_camera_0", "empty_camera_1"]


@pytest.mark.parametrize("kind", KINDS)
def test_keys_with_or_without_the_model_prefix(kind: str, tmp_path: Path) -> None:
    write_folder(tmp_path / "with", kind)
    bare = write_folder(tmp_path / "without", kind, prefix=False)
    assert not any(k.startswith("model.") for k in bare.tensors)
    (cfg_a, a), (cfg_b, b) = read(tmp_path / "with", kind), read(tmp_path / "without", kind)
    assert cfg_a == cfg_b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_key_saved_twice_is_refused(tmp_path: Path) -> None:
    f = write_folder(tmp_path, "pi0")
    key = "model.state_proj.weight"
    twice = {**f.tensors, key.removeprefix("model."): f.tensors[key].clone()}
    save_file(twice, str(tmp_path / "model.safetensors"))
    with pytest.raises(WalkforgeError, match="both with and without the 'model.' prefix") as exc:
        read(tmp_path, "pi0")
    one_line(exc)


@pytest.mark.parametrize("kind", KINDS)
def test_odd_head_size_needs_and_takes_the_config_heads(kind: str, tmp_path: Path) -> None:
    write_folder(tmp_path / "ckpt", kind, odd_cfg(kind))
    with pytest.raises(WalkforgeError, match="cannot infer the head size .*q 48, kv 12") as exc:
        read(tmp_path / "ckpt", kind)
    one_line(exc)
    (tmp_path / "heads.json").write_text(json.dumps(ODD_HEADS))
    manifest = compile_bundle(CompileRequest(kind, tmp_path / "out", checkpoint=tmp_path / "ckpt",
                                             config_file=tmp_path / "heads.json", gpu_archs=()))
    assert manifest["config"]["llm"]["heads"] == 4 and manifest["config"]["llm"]["head_dim"] == 12
    assert manifest["policy"]["source"] == "lerobot"


def test_overrides_that_disagree_with_the_tensors_name_the_field(tmp_path: Path) -> None:
    write_folder(tmp_path, "pi0")
    with pytest.raises(WalkforgeError, match=r"^llm.layers: --config says 3 but the tensors give 2$") as exc:
        read(tmp_path, "pi0", {"llm": {"layers": 3}})
    one_line(exc)
    with pytest.raises(WalkforgeError, match=r"expert.heads × head_dim: --config says 64 .* give 32"):
        read(tmp_path, "pi0", {"expert": {"heads": 4, "head_dim": 16}})


def test_named_variant_that_the_tensors_contradict(tmp_path: Path) -> None:
    tiny = get_recipe("pi0").variant("tiny")  # an expert of gemma_300m's width, but 2 layers
    wide = replace(tiny, expert=replace(tiny.expert, width=1024))
    write_folder(tmp_path, "pi0", wide)
    with pytest.raises(WalkforgeError, match=r"^expert.layers: config.json action_expert_variant "
                                             r"gemma_300m says 18 but the tensors give 2$") as exc:
        read(tmp_path, "pi0")
    one_line(exc)
    with pytest.raises(WalkforgeError, match=r"^expert.mlp: .*gemma_300m says 4096 but the tensors give 64"):
        read(tmp_path, "pi0", {"expert": {"layers": 2}})  # the override replaces the variant's layers


def test_a_matching_named_variant_gives_the_head_split(tmp_path: Path) -> None:
    """Shapes alone would split q 64 into 4 heads of 16 (the tiny variant); config.json's gemma
    width 64 is no LeRobot variant, so an override-free read keeps the shape inference."""
    f = write_folder(tmp_path, "pi0")
    assert read(tmp_path, "pi0")[0].llm == f.cfg.llm


def rewrite(path: Path, name: str, change: Callable[[dict], None]) -> None:
    data = json.loads((path / name).read_text())
    change(data)
    (path / name).write_text(json.dumps(data))


def restat(path: Path, file: str, key: str, value: torch.Tensor | None) -> None:
    stats = load_file(str(path / file))
    if value is None:
        stats.pop(key)
    else:
        stats[key] = value
    save_file(stats, str(path / file))


BAD_CONFIGS = {
    "max_action_dim": (lambda m: m.update(max_action_dim=24),
                       r"config.json max_action_dim is 24 but model.action_in_proj takes 32"),
    "max_state_dim": (lambda m: m.update(max_state_dim=16),
                      r"max_state_dim is 16 but model.state_proj takes 32"),
    "image_resolution": (lambda m: m.update(image_resolution=[256, 256]),
                         r"image_resolution is \[256, 256\] but the vision tower.* \[224, 224\]"),
    "state shape": (lambda m: m["input_features"]["observation.state"].update(shape=[40]),
                    r"input_features.observation.state.shape is \[40\]: want \[d\] with 1 ≤ d ≤ 32"),
    "n_action_steps": (lambda m: m.update(n_action_steps=60),
                       r"n_action_steps 60 must be in \[1, chunk_size 50\]"),
    "variant name": (lambda m: m.update(paligemma_variant="gemma_7b"),
                     r"paligemma_variant is 'gemma_7b': one of gemma_2b, gemma_300m"),
    "mode": (lambda m: m["normalization_mapping"].update(STATE="ZSCORE"),
             r"normalization_mapping.STATE is 'ZSCORE': one of IDENTITY, MEAN_STD, MIN_MAX, QUANTILES"),
    "visual mode": (lambda m: m["normalization_mapping"].update(VISUAL="MEAN_STD"),
                    r"VISUAL is MEAN_STD: only IDENTITY"),
    "processor mode": (lambda m: m["normalization_mapping"].update(STATE="MIN_MAX"),
                       r"policy_preprocessor.json normalizer_processor normalises STATE with MEAN_STD but "
                       r"config.json normalization_mapping says MIN_MAX"),
    "type": (lambda m: m.update(type="pi05"), r"a LeRobot 'pi05' folder, not pi0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_json_is_one_line(case: str, tmp_path: Path) -> None:
    change, message = BAD_CONFIGS[case]
    write_folder(tmp_path, "pi0")
    rewrite(tmp_path, "config.json", change)
    with pytest.raises(WalkforgeError, match=message) as exc:
        read(tmp_path, "pi0")
    one_line(exc)


BAD_STATS = {
    "missing stat": (lambda p: restat(p, PRE_STATS["pi0"], "observation.state.std", None),
                     r"STATE is normalised with MEAN_STD but no processor stats file holds "
                     r"'observation.state.std'"),
    "stat shape": (lambda p: restat(p, PRE_STATS["pi0"], "observation.state.mean", torch.zeros(9)),
                   r"stat 'observation.state.mean' has shape \[9\], the feature has dim 7"),
    "stats differ": (lambda p: restat(p, POST_STATS, "action.mean", torch.zeros(6)),
                     r"stat 'action.mean' differs from the one in another stats file"),
    "stats file gone": (lambda p: (p / POST_STATS).unlink(),
                        r"names policy_postprocessor_step_0.* which .* lacks"),
    "state_file path": (lambda p: rewrite(p, "policy_postprocessor.json",
                                          lambda d: d["steps"][0].update(state_file="../x.safetensors")),
                        r"state_file '../x.safetensors' must be a file name in the folder"),
    "processor json": (lambda p: (p / "policy_preprocessor.json").write_text("{"),
                       r"not a LeRobot processor file"),
    "one processor file": (lambda p: (p / f"{PRE}.json").unlink(),
                           r"has policy_postprocessor.json but not policy_preprocessor.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATS))
def test_bad_processors_and_stats_are_one_line(case: str, tmp_path: Path) -> None:
    change, message = BAD_STATS[case]
    write_folder(tmp_path, "pi0")
    change(tmp_path)
    with pytest.raises(WalkforgeError, match=message) as exc:
        read(tmp_path, "pi0")
    one_line(exc)


def test_identity_folder_needs_no_stats(tmp_path: Path) -> None:
    write_folder(tmp_path, "pi05", normalization=dict.fromkeys(("VISUAL", "STATE", "ACTION"), "IDENTITY"))
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        (tmp_path / name).unlink()
    got = read(tmp_path, "pi05")
    assert got.manifest["policy"]["stats"] is None and got.files == {}
    assert got.manifest["policy"]["hub_tokenizer"] is None


@pytest.mark.parametrize("kind", KINDS)
def test_folder_compiles_with_stats_and_tokenizer_in_the_bundle(kind: str, tmp_path: Path,
                                                                gemma_tokenizer: Path) -> None:
    write_folder(tmp_path / "ckpt", kind)
    out = tmp_path / "out"
    manifest = compile_bundle(CompileRequest(kind, out, checkpoint=tmp_path / "ckpt",
                                             tokenizer=gemma_tokenizer, gpu_archs=()))
    policy = manifest["policy"]
    names = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"]
    assert policy["tokenizer"] == {"dir": "policy/tokenizer", "files": names}
    for rel in ["policy/stats.safetensors", *(f"policy/tokenizer/{n}" for n in names)]:
        assert manifest["files"][rel]["sha256"] and (out / rel).is_file(), rel
    for n in names:
        assert (out / "policy/tokenizer" / n).read_bytes() == (gemma_tokenizer / n).read_bytes()
    assert set(load_file(str(out / "policy/stats.safetensors"))) >= {"observation.state.mean", "action.q99"}


def test_variant_compile_has_the_default_entry_and_takes_a_tokenizer(tmp_path: Path,
                                                                     gemma_tokenizer: Path) -> None:
    result = CliRunner().invoke(cli, ["compile", "pi05", "--variant", "tiny", "--tokenizer",
                                      str(gemma_tokenizer), "--gpu-archs", "", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    policy = json.loads((tmp_path / "b" / "manifest.json").read_text())["policy"]
    assert policy["source"] == "variant" and policy["stats"] is None
    assert [c["key"] for c in policy["cameras"]] == ["observation.images.cam_0", "observation.images.cam_1"]
    assert policy["normalization"] == dict.fromkeys(("VISUAL", "STATE", "ACTION"), "IDENTITY")
    assert policy["tokenizer"]["files"][0] == "tokenizer.model"
    assert (tmp_path / "b" / "policy/tokenizer/tokenizer.model").is_file()


def test_tokenizer_folder_errors_are_one_line(tmp_path: Path, gemma_tokenizer: Path) -> None:
    cfg = get_recipe("pi0").variant("tiny")
    entry = {"policy": {"tokenizer": None}}
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(b"not a model")
    cases = {tmp_path / "nowhere": "not a folder", tmp_path / "empty": "neither tokenizer.model",
             tmp_path / "bad": r"tokenizer.model: not loadable"}
    for folder, message in cases.items():
        with pytest.raises(WalkforgeError, match=message) as exc:
            bundle_tokenizer(entry, folder, cfg)
        one_line(exc)
    small = replace(cfg, llm=replace(cfg.llm, vocab=300))
    with pytest.raises(WalkforgeError, match=r"tokenizer.model: vocab size 320 exceeds .* llm.vocab 300"):
        bundle_tokenizer(entry, gemma_tokenizer, small)
    with pytest.raises(WalkforgeError, match="recipe 'vae' takes no text prompt"):
        compile_bundle(CompileRequest("vae", tmp_path / "v", variant="tiny", tokenizer=gemma_tokenizer))


@pytest.mark.parametrize("rel", ["/etc/x", "../x", "a/../../x", "weights/model.safetensors", "manifest.json"])
def test_extra_files_stay_inside_the_bundle(rel: str, tmp_path: Path) -> None:
    with pytest.raises(WalkforgeError, match="must be a relative path inside the bundle"):
        write_extra_files(tmp_path, {rel: b"x"})
    assert write_extra_files(tmp_path, {"policy/a.bin": b"x", "policy/b.bin": tmp_path / "policy/a.bin"}) == 2
    assert (tmp_path / "policy/b.bin").read_bytes() == b"x"


def test_bf16_folder_as_published_loads(tmp_path: Path) -> None:
    f = write_folder(tmp_path, "pi05", dtype=torch.bfloat16)
    cfg, tensors = read(tmp_path, "pi05")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = get_recipe("pi05").build(cfg)
    load_strict(model, tensors, get_recipe("pi05").key_map)
    assert torch.equal(model.llm.embed_tokens.weight, f.tensors[LM_HEAD].float())
