"""BAGEL (ByteDance-Seed's unified model) text-to-image: a Qwen2 Mixture-of-Transformers LLM with
"und" and "gen" experts, rectified flow with classifier-free guidance, the FLUX VAE decoder.

config.py      BagelConfig and its variants (bagel = 7B-MoT, small, tiny)
model.py       the modules, the CFG combine and the eager `generate`
walks.py       prefill → Loop(denoise, shifted Euler) → decode, fake inputs, kernel shapes
checkpoint.py  BAGEL's published layout (ema.safetensors, ae.safetensors in BFL names) and key map
"""

from __future__ import annotations

from walkforge.recipes.bagel import checkpoint, config, model, walks
from walkforge.recipes.recipe import Recipe

RECIPE = Recipe(
    name="bagel",
    config=config.BagelConfig,
    variants=config.VARIANTS,
    build=model.build,
    walks=walks.walks,
    key_map=checkpoint.KEY_MAP,
    read_checkpoint=checkpoint.read_checkpoint,
    fake_inputs=walks.fake_inputs,
    front="bagel",
    precisions=("fp32", "fp8"),
    # prompt length, cache rows (CFG branches × images) and the latent grid are dynamic
    trt_dims=walks.trt_dims,
    kernel_shapes=walks.kernel_shapes,
)
