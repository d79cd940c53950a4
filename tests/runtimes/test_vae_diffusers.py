"""The VAE front as diffusers users have it, against diffusers itself on random weights: bundles
compiled (`--walks decode,encode`) from pipeline folders of SD-, FLUX- and SD3-style VAEs, then
`decode`, `to_image` (the pipelines' un-scaling + VaeImageProcessor), tiled decode
(`enable_tiling()`) and `encode` (`latent_dist`), batch 2, non-square."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_diffusers_vae
from tolerances import rel_err, vae_decode_tol

import walkforge
from walkforge import CompileRequest, compile_bundle
from walkforge.recipes.vae.config import VaeConfig
from walkforge.runtimes.fronts.vae import VaeDecoder, png_bytes, save_png

diffusers = pytest.importorskip("diffusers")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402

UINT8_LEVELS = 1  # to_image vs the pipeline's PIL images: a 1e-6 sample difference can flip one rounding
SMALL = {"layers_per_block": 1, "norm_num_groups": 8}
LATENT16 = {"latent_channels": 16, "use_post_quant_conv": False}  # FLUX / SD3: no quant convs
STYLES = {  # (decoder sizes, config.json scaling); sample_size is small so tiling is cheap
    "sd": (VaeConfig(block_out_channels=(16, 32), latent_channels=4, **SMALL),
           {"scaling_factor": 0.18215, "sample_size": 16}),
    "flux": (VaeConfig(block_out_channels=(16, 32), **LATENT16, **SMALL),
             {"scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 16}),
    "sd3": (VaeConfig(block_out_channels=(16, 32, 32), **LATENT16, **SMALL),
            {"scaling_factor": 1.5305, "shift_factor": 0.0609, "sample_size": 16}),
}
LATENT_HW = (20, 12)  # non-square, several tiles each way at every style's tile size


def pipeline_folder(style: str, root: Path):
    """(diffusers AutoencoderKL, a pipeline root holding it as vae/ with a model_index.json)."""
    cfg, scaling = STYLES[style]
    model = make_diffusers_vae(cfg)
    model.register_to_config(**scaling)
    model.save_pretrained(root / "vae", safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
         "unet": ["diffusers", "UNet2DConditionModel"]}))
    return model


@pytest.fixture(scope="module", params=list(STYLES))
def compiled(request, tmp_path_factory: pytest.TempPathFactory):
    """(style, diffusers AutoencoderKL, the bundle compiled from its pipeline root, loaded)."""
    root = tmp_path_factory.mktemp(f"pipeline-{request.param}")
    model = pipeline_folder(request.param, root)
    compile_bundle(CompileRequest("vae", root / "bundle", checkpoint=root, walks=("decode", "encode")))
    return request.param, model, walkforge.load(root / "bundle", spinning=False)  # torch runs too


def latents(channels: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, channels, *LATENT_HW), dtype=np.float32)


def tol(style: str) -> float:
    return vae_decode_tol(max(STYLES[style][0].block_out_channels))


def reference_decode(model, z: np.ndarray, tile: int | None = None) -> np.ndarray:
    """diffusers' decode; with `tile`, after enable_tiling() at a tile of that many pixels."""
    model.disable_tiling()
    if tile is not None:
        model.enable_tiling()
        model.tile_sample_min_size = tile
        model.tile_latent_min_size = int(tile / 2 ** (len(model.config.block_out_channels) - 1))
    with torch.no_grad():
        return model.decode(torch.from_numpy(z)).sample.numpy()


def pipeline_images(model, z: np.ndarray) -> np.ndarray:
    """What SD / FLUX / SD3 pipelines return as PIL images for latents `z`, as uint8 NHWC."""
    c = model.config
    x = torch.from_numpy(z) / c.scaling_factor
    if c.shift_factor is not None:
        x = x + c.shift_factor
    model.disable_tiling()
    with torch.no_grad():
        sample = model.decode(x).sample
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(c.block_out_channels) - 1))
    return np.stack([np.asarray(im) for im in processor.postprocess(sample, output_type="pil")])


def test_manifest_keeps_the_scaling(compiled) -> None:
    style, model, vae = compiled
    entry = vae.manifest["vae"]
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
                "sample_size"):
        assert entry[key] == model.config[key]
    assert vae.scaling["sample_size"] == STYLES[style][1]["sample_size"]
    weights = vae.manifest["weights"]
    assert (weights["loaded"], weights["ignored"]) == (len(model.state_dict()), 0)  # encoder too


def test_decode_matches_diffusers(compiled) -> None:
    style, model, vae = compiled
    z = latents(model.config.latent_channels)
    got, want = vae.decode(z), reference_decode(model, z)
    assert got.shape == want.shape
    assert rel_err(got, want) <= tol(style)


def test_to_image_matches_the_pipeline(compiled) -> None:
    _, model, vae = compiled
    z = latents(model.config.latent_channels, seed=2)
    got, want = vae.to_image(z), pipeline_images(model, z)
    assert got.dtype == np.uint8 and got.shape == want.shape == (2, *want.shape[1:3], 3)
    assert np.abs(got.astype(int) - want).max() <= UINT8_LEVELS


@pytest.mark.parametrize("tile", [None, 32])
def test_tiled_decode_matches_diffusers(compiled, tile: int | None) -> None:
    """None: the tile of config.json's sample_size (what enable_tiling() uses); 32: a set tile."""
    style, model, vae = compiled
    z = latents(model.config.latent_channels, seed=3)
    got = vae.decode(z, tiled=True, tile_size=tile)
    want = reference_decode(model, z, tile or model.config.sample_size)
    assert got.shape == want.shape
    assert rel_err(got, want) <= tol(style)
    assert rel_err(got, vae.decode(z)) > 10 * tol(style)  # tiles really were cut and blended


def test_tiled_to_image_and_small_latents_untiled(compiled) -> None:
    _, model, vae = compiled
    z = latents(model.config.latent_channels, seed=4)
    tiled = vae.to_image(z, tiled=True)
    np.testing.assert_array_equal(tiled, vae.to_image(z, tiled=True, tile_size=None))
    small = z[:, :, :4, :4]  # within one tile: enable_tiling() decodes it whole
    np.testing.assert_array_equal(vae.decode(small, tiled=True), vae.decode(small))


def test_latents_mean_std_unscaling() -> None:
    """SDXL-style configs with latents_mean/std: latents · std / scaling + mean, per channel."""
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.0, 1.5]
    front = VaeDecoder.__new__(VaeDecoder)
    front.manifest = {"vae": {"scaling_factor": 0.5, "latents_mean": mean, "latents_std": std}}
    z = latents(4)
    want = z * np.float32(std).reshape(1, 4, 1, 1) / np.float32(0.5) + np.float32(mean).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(front.unscale(z), want, rtol=1e-6)
    front.manifest = {}  # a bundle without a checkpoint: diffusers' AutoencoderKL defaults
    np.testing.assert_array_equal(front.unscale(z), z / np.float32(0.18215))


def test_png_files(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    paths = save_png(images, tmp_path / "out.png")
    assert [p.name for p in paths] == ["out-0.png", "out-1.png"]
    assert save_png(images[:1], tmp_path / "one.png") == [tmp_path / "one.png"]
    from PIL import Image

    for path, image in zip(paths, images, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    assert png_bytes(images[0]).startswith(b"\x89PNG")


def test_cli_run_writes_pngs(compiled, tmp_path: Path) -> None:
    from walkforge.cli import main

    _, model, vae = compiled
    z = latents(model.config.latent_channels, seed=5)
    np.savez(tmp_path / "in.npz", latents=z)
    with pytest.raises(SystemExit) as done:
        main(["run", str(vae.bundle.root), "--inputs", str(tmp_path / "in.npz"),
              "-o", str(tmp_path / "img.png")])
    assert done.value.code == 0
    from PIL import Image

    got = np.stack([np.asarray(Image.open(tmp_path / f"img-{i}.png")) for i in range(2)])
    np.testing.assert_array_equal(got, vae.to_image(z))


def images(seed: int = 6) -> np.ndarray:
    shape = (2, 3, 2 * LATENT_HW[0], 2 * LATENT_HW[1])
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def reference_dist(model, x: np.ndarray):
    model.disable_tiling()  # an earlier test's enable_tiling() would tile the encode too
    with torch.no_grad():
        return model.encode(torch.from_numpy(x)).latent_dist


def test_encode_mean_and_sample_match_diffusers(compiled) -> None:
    style, model, vae = compiled
    x = images()
    dist = reference_dist(model, x)
    got = vae.encode(x)
    assert got.shape == tuple(dist.mean.shape)
    assert rel_err(got, dist.mean) <= tol(style)
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dist.sample(generator=torch.Generator().manual_seed(0))  # mean + std · that noise
    assert rel_err(vae.encode(x, sample=noise.numpy()), want) <= tol(style)
    seeded = vae.encode(x, sample=7)
    np.testing.assert_array_equal(seeded, vae.encode(x, sample=7))
    assert not np.array_equal(seeded, got)


def test_encode_scaled_as_img2img_pipelines(compiled) -> None:
    style, model, vae = compiled
    x = images(seed=7)
    mean, c = reference_dist(model, x).mean, model.config
    want = (mean - (c.shift_factor or 0.0)) * c.scaling_factor  # SD: latents · scaling; FLUX/SD3: shifted
    assert rel_err(vae.encode(x, scaled=True), want) <= tol(style)
    np.testing.assert_allclose(vae.unscale(vae.scale(mean.numpy())), mean.numpy(), rtol=1e-5, atol=1e-6)


def test_encode_uint8_images_and_torch_backend(compiled) -> None:
    style, _, vae = compiled
    pixels = np.random.default_rng(8).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    as_float = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255 * 2 - 1
    np.testing.assert_array_equal(vae.encode(pixels), vae.encode(np.ascontiguousarray(as_float)))
    reference = walkforge.load(vae.bundle.root, backend="torch")  # rebuilds the encoder from the weights
    assert set(reference.engines) == {"decode", "encode"}
    assert rel_err(vae.encode(pixels), reference.encode(pixels)) <= tol(style)
