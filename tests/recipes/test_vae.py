"""VAE recipe: parity against diffusers' AutoencoderKL on random weights, strict loading,
config reading and the walk contract."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_diffusers_vae
from tolerances import rel_err, vae_decode_tol

from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import TensorSpec
from walkforge.recipes import get_recipe
from walkforge.recipes.vae.checkpoint import config_from_diffusers
from walkforge.recipes.vae.config import VaeConfig
from walkforge.recipes.weights import load_strict

diffusers = pytest.importorskip("diffusers")
VAE = get_recipe("vae")


def diffusers_vae(cfg: VaeConfig, seed: int = 0) -> torch.nn.Module:
    """A diffusers AutoencoderKL shaped like `cfg`, random weights, norms moved off 1/0."""
    return make_diffusers_vae(cfg, seed)


def saved(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def check_parity(cfg: VaeConfig, folder: Path, latents_shape: tuple[int, ...]) -> None:
    reference = diffusers_vae(cfg)
    read_cfg, tensors = VAE.read_checkpoint(saved(reference, folder))
    assert read_cfg == cfg
    model = VAE.build(read_cfg).eval()
    counts = load_strict(model, tensors, VAE.key_map)
    assert counts["loaded"] == len(model.state_dict())
    latents = torch.randn(*latents_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(latents), reference.decode(latents).sample
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= vae_decode_tol(max(cfg.block_out_channels))  # measured: identical


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved(diffusers_vae(VAE.variants["tiny"]), tmp_path_factory.mktemp("tiny_vae"))


@pytest.mark.parametrize("attention", [True, False])
def test_tiny_matches_diffusers(tmp_path: Path, attention: bool) -> None:
    cfg = dataclasses.replace(VAE.variants["tiny"], mid_block_add_attention=attention)
    check_parity(cfg, tmp_path, (2, 4, 8, 6))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd", "flux"])
def test_full_size_variant_matches_diffusers(tmp_path: Path, variant: str) -> None:
    cfg = VAE.variants[variant]
    check_parity(cfg, tmp_path, (1, cfg.latent_channels, 8, 8))


def test_flux_variant_has_no_post_quant_conv() -> None:
    keys = VAE.build(VAE.variants["flux"]).state_dict()
    assert not any(k.startswith("post_quant_conv.") for k in keys)
    assert keys["decoder.conv_in.weight"].shape[1] == 16


def test_encoder_keys_counted_as_ignored(tiny_folder: Path) -> None:
    cfg, tensors = VAE.read_checkpoint(tiny_folder)
    model = VAE.build(cfg)
    counts = load_strict(model, tensors, VAE.key_map)
    unused = [k for k in tensors if k.startswith(("encoder.", "quant_conv."))]
    assert len(unused) > 0
    assert counts == {"loaded": len(model.state_dict()), "ignored": len(unused)}
    assert counts["loaded"] + counts["ignored"] == len(tensors)


def test_misshaped_tensor_names_key_and_shapes(tiny_folder: Path) -> None:
    cfg, tensors = VAE.read_checkpoint(tiny_folder)
    tensors["decoder.conv_in.weight"] = torch.zeros(64, 4, 1, 1)
    with pytest.raises(WalkforgeError) as err:
        load_strict(VAE.build(cfg), tensors, VAE.key_map)
    message = str(err.value)
    assert "decoder.conv_in.weight" in message
    assert "[64, 4, 1, 1]" in message and "[64, 4, 3, 3]" in message


def test_missing_tensor_names_key(tiny_folder: Path) -> None:
    cfg, tensors = VAE.read_checkpoint(tiny_folder)
    del tensors["decoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(WalkforgeError, match=r"missing 'decoder\.mid_block\.attentions\.0\.to_q\.weight'"):
        load_strict(VAE.build(cfg), tensors, VAE.key_map)


def test_unexpected_tensor_raises(tiny_folder: Path) -> None:
    cfg, tensors = VAE.read_checkpoint(tiny_folder)
    tensors["decoder.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(WalkforgeError, match=r"unexpected checkpoint tensor 'decoder\.extra_head\.weight'"):
        load_strict(VAE.build(cfg), tensors, VAE.key_map)


def write_config(folder: Path, data: dict | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"],
          "block_out_channels": [32, 64], "norm_num_groups": 8}, "up_block_types"),
        ({"act_fn": "gelu"}, "act_fn 'gelu'"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
        ({"norm_type": "spatial"}, "norm_type"),
        ({"block_out_channels": [48], "norm_num_groups": 32}, "divisible by norm_num_groups"),
    ],
)
def test_bad_config_json_raises(tmp_path: Path, config: dict | str, message: str) -> None:
    with pytest.raises(WalkforgeError, match=message):
        VAE.read_checkpoint(write_config(tmp_path / "ckpt", config))


def test_missing_config_json_raises(tmp_path: Path) -> None:
    with pytest.raises(WalkforgeError, match="no config.json"):
        VAE.read_checkpoint(tmp_path)


def test_old_sd_config_uses_diffusers_defaults() -> None:
    sd15 = {  # SD-1.5 vae/config.json: no use_post_quant_conv, no mid_block_add_attention
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    assert config_from_diffusers(sd15) == VAE.variants["sd"]


@pytest.mark.parametrize("variant", ["tiny", "flux"])
def test_walks_contract(variant: str) -> None:
    cfg = VAE.variants[variant]
    model = VAE.build(cfg).eval()
    walk = VAE.walks(model, cfg)
    node = walk.node("decode")
    assert walk.steps == ("decode",)
    assert node.module is model
    assert node.inputs == (
        TensorSpec("latents", "float32", ("batch", cfg.latent_channels, "height", "width")),
    )
    assert node.outputs == (
        TensorSpec("sample", "float32", ("batch", cfg.out_channels, "sample_height", "sample_width")),
    )
    example = node.example_inputs["latents"]
    assert example.shape[1] == cfg.latent_channels
    assert min(example.shape[0], example.shape[2], example.shape[3]) >= 2


def test_tiny_walk_output_shape_follows_upscale() -> None:
    cfg = VAE.variants["tiny"]
    example = VAE.walks(VAE.build(cfg), cfg).node("decode").example_inputs["latents"]
    with torch.no_grad():
        out = VAE.build(cfg).eval()(example)
    b, _, h, w = example.shape
    assert out.shape == (b, cfg.out_channels, h * cfg.upscale, w * cfg.upscale)


def test_fake_inputs_are_seeded_standard_normal() -> None:
    cfg = VAE.variants["flux"]
    a = VAE.fake_inputs(cfg, batch=3, seed=5, height=4, width=6)
    b = VAE.fake_inputs(cfg, batch=3, seed=5, height=4, width=6)
    assert set(a) == {"latents"}
    assert a["latents"].dtype == np.float32 and a["latents"].shape == (3, 16, 4, 6)
    np.testing.assert_array_equal(a["latents"], b["latents"])
    other = VAE.fake_inputs(cfg, batch=3, seed=6, height=4, width=6)
    assert not np.array_equal(a["latents"], other["latents"])


# -- folders as diffusers has them: pipeline roots, weights variants, shards -------------------


def pipeline_root(model: torch.nn.Module, root: Path, **save: object) -> Path:
    model.save_pretrained(root / "vae", safe_serialization=True, **save)
    (root / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    return root


def test_pipeline_root_finds_the_vae_and_keeps_scaling(tmp_path: Path) -> None:
    reference = diffusers_vae(VAE.variants["tiny"])
    reference.register_to_config(scaling_factor=0.13025, shift_factor=0.1, sample_size=64)
    read = VAE.read_checkpoint(pipeline_root(reference, tmp_path))
    cfg, tensors = read
    assert cfg == VAE.variants["tiny"] and set(tensors) == set(reference.state_dict())
    assert read.manifest == {"vae": {"scaling_factor": 0.13025, "shift_factor": 0.1, "latents_mean": None,
                                     "latents_std": None, "force_upcast": True, "sample_size": 64}}


def test_weights_variant_picks_its_file_and_only_that(tmp_path: Path) -> None:
    reference = diffusers_vae(VAE.variants["tiny"])
    root = pipeline_root(reference, tmp_path)
    reference.to(torch.float16).save_pretrained(root / "vae", safe_serialization=True, variant="fp16")
    plain = VAE.read_checkpoint(root)[1]
    half = VAE.read_checkpoint(root, weights_variant="fp16")[1]
    assert set(plain) == set(half) == set(reference.state_dict())  # one file each, not both merged
    assert {t.dtype for t in plain.values()} == {torch.float32}
    assert {t.dtype for t in half.values()} == {torch.float16}
    with pytest.raises(WalkforgeError, match=r"no diffusion_pytorch_model\.bf16\.safetensors.*found"):
        VAE.read_checkpoint(root, weights_variant="bf16")


def test_sharded_weights_load(tmp_path: Path) -> None:
    reference = diffusers_vae(VAE.variants["tiny"])
    root = pipeline_root(reference, tmp_path, max_shard_size="100KB")
    assert (root / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    cfg, tensors = VAE.read_checkpoint(root)
    model = VAE.build(cfg)
    assert load_strict(model, tensors, VAE.key_map)["loaded"] == len(model.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)


def test_pipeline_without_vae_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "U"]}))
    with pytest.raises(WalkforgeError, match="no 'vae' component; components: unet"):
        VAE.read_checkpoint(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(WalkforgeError, match="vae/config.json is missing"):
        VAE.read_checkpoint(tmp_path)


@pytest.mark.parametrize(("fields", "message"), [
    ({"weights_variant": "fp8"}, r"^--weights-variant must be one of fp16, bf16, got 'fp8'$"),
    ({"weights_variant": "fp16"}, "give --checkpoint"),
])
def test_weights_variant_request_checked(tmp_path: Path, fields: dict, message: str) -> None:
    from walkforge import CompileRequest

    with pytest.raises(WalkforgeError, match=message):
        CompileRequest("vae", tmp_path / "b", **fields)


def test_encoder_matches_diffusers_and_grows_from_weights(tiny_folder: Path) -> None:
    cfg, tensors = VAE.read_checkpoint(tiny_folder)
    model = VAE.build(cfg, walks=("decode", "encode")).eval()
    assert load_strict(model, tensors, VAE.key_map) == {"loaded": len(tensors), "ignored": 0}
    reference = diffusers_vae(cfg)  # the same seed: the weights tiny_folder holds
    images = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mean, std = model.encode(images)
        dist = reference.encode(images).latent_dist
    assert rel_err(mean, dist.mean) <= vae_decode_tol(max(cfg.block_out_channels))  # measured: identical
    assert rel_err(std, dist.std) <= vae_decode_tol(max(cfg.block_out_channels))
    grown = VAE.build(cfg)  # decoder only, as the torch backend builds it from a bundle's config
    grown.load_state_dict(model.state_dict(), strict=True)
    assert [n.name for n in VAE.walks(grown, cfg).nodes] == ["decode", "encode"]
    decode = VAE.walks(grown, cfg).node("decode").module
    assert set(decode.state_dict()) == set(VAE.build(cfg).state_dict())  # a walk holds only its own


@pytest.mark.parametrize("walks", [("encode",), ("decode", "upscale")])
def test_bad_walks_refused(walks: tuple[str, ...]) -> None:
    with pytest.raises(WalkforgeError, match="--walks: the vae recipe compiles decode and optionally encode"):
        VAE.build(VAE.variants["tiny"], walks=walks)
