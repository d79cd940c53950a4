"""SmolVLA (LeRobot's): SmolVLM2 (SigLIP tower, pixel-shuffle connector, the first 16 SmolLM2
layers) and a narrower Llama action expert that alternates self- and cross-attention layers, flow
matching; three walks. The cross-attention K/V are computed once per chunk in prefill and live in
extra layers of the page pool (model.py).

config.py      SmolVLAConfig and its variants
model.py       the modules, the prefix and the cross K/V, the caches and the eager `sample_actions`
walks.py       vision → prefill → Loop(denoise), fake inputs
checkpoint.py  LeRobot's key map, the config from config.json + SmolVLM2's config.json, the folder reader
"""

from __future__ import annotations

from walkforge.recipes import lerobot
from walkforge.recipes.blocks import flow
from walkforge.recipes.recipe import Recipe
from walkforge.recipes.smolvla import checkpoint, config, model, walks

RECIPE = Recipe(
    name="smolvla",
    config=config.SmolVLAConfig,
    variants=config.VARIANTS,
    build=model.build,
    walks=walks.walks,
    key_map=checkpoint.KEY_MAP,
    read_checkpoint=checkpoint.read_checkpoint,
    fake_inputs=walks.fake_inputs,
    front="smolvla",
    precisions=("fp32", "fp8", "int8"),
    # the compacted prefix's dims as pi0's: cameras (≤ num_views, 64 tokens each at 512 px) and
    # prompt tokens (≤ max_prompt_len); the state token is always there
    trt_dims=flow.prefix_trt_dims,
    kernel_shapes=flow.expert_kernel_shapes,
    variant_manifest=checkpoint.POLICY.variant_manifest,
    tokenizer=lerobot.bundle_tokenizer,
)
