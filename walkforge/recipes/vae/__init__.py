"""VAE: diffusers AutoencoderKL, walk `decode` (latents → pixels) and, with `--walks
decode,encode`, walk `encode` (pixels → the latent distribution's mean and std).

Covers the SD-1.5/SDXL VAE (4 latent channels, quant convs) and the FLUX/SD3 VAEs (16 latent
channels, none). The walks take latents unscaled; the front applies the checkpoint's
`scaling_factor`/`shift_factor`/`latents_mean`/`latents_std` (kept in the manifest's `vae` entry)
in `to_image` and `encode(scaled=True)`, and tiles decodes as diffusers' `enable_tiling()`.
Native checkpoints are diffusers pipeline or VAE folders; a decode-only build counts the encoder
half as ignored.

config.py      VaeConfig and its variants
model.py       build: the shared AutoencoderKL block (decoder, optionally the encoder)
walks.py       decode, encode, fake inputs
checkpoint.py  diffusers' key map, config mapping and folder reader
"""

from __future__ import annotations

from walkforge.recipes.recipe import Recipe
from walkforge.recipes.vae import checkpoint, config, model, walks

RECIPE = Recipe(
    name="vae",
    config=config.VaeConfig,
    variants=config.VARIANTS,
    build=model.build,
    walks=walks.walks,
    key_map=checkpoint.KEY_MAP,
    read_checkpoint=checkpoint.read_checkpoint,
    fake_inputs=walks.fake_inputs,
    front="vae",
    precisions=("fp32", "fp8", "int8"),
    trt_dims=walks.trt_dims,
)
