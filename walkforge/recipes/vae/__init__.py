"""VAE decoder: diffusers AutoencoderKL latents → pixels, one walk (`decode`).

Covers the SD-1.5/SDXL VAE (4 latent channels, post_quant_conv) and the FLUX VAE (16 latent
channels, none). Latents go in unscaled: applying `scaling_factor`/`shift_factor` is the
caller's job. Native checkpoints are diffusers folders (`config.json` +
`diffusion_pytorch_model.safetensors`); the encoder half is read and ignored.

config.py      VaeConfig and its variants
model.py       build: the shared AutoencoderKL decoder block
walks.py       decode, fake inputs
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
    precisions=("fp32", "fp8"),
    trt_dims={"height": (8, 64, 128), "width": (8, 64, 128)},  # latent sides (pixels ÷ upscale)
)
