"""pi0 (LeRobot's): a PaliGemma VLM and a Gemma action expert, flow matching; three walks.

config.py      Pi0Config and its variants
model.py       the modules, the attention rule, the caches and the eager `sample_actions`
walks.py       vision → prefill → Loop(denoise), fake inputs, kernel shapes
checkpoint.py  LeRobot's key map and folder reader
(the manifest's "policy" entry — cameras, dims, normalisation, stats, tokenizer — is recipes/lerobot.py)
"""

from __future__ import annotations

from walkforge.recipes import lerobot
from walkforge.recipes.blocks import flow
from walkforge.recipes.pi0 import checkpoint, config, model, walks
from walkforge.recipes.recipe import Recipe

RECIPE = Recipe(
    name="pi0",
    config=config.Pi0Config,
    variants=config.VARIANTS,
    build=model.build,
    walks=walks.walks,
    key_map=checkpoint.KEY_MAP,
    read_checkpoint=checkpoint.read_checkpoint,
    fake_inputs=walks.fake_inputs,
    front="pi0",
    precisions=("fp32", "fp8", "int8"),
    # TensorRT ranges of the dims besides batch and the KV pages: cameras (≤ num_views, 256 tokens
    # each at 224 px) and prompt tokens (≤ max_prompt_len) are dynamic, the front compacts them
    trt_dims=flow.prefix_trt_dims,
    kernel_shapes=flow.expert_kernel_shapes,
    variant_manifest=checkpoint.POLICY.variant_manifest,
    tokenizer=lerobot.bundle_tokenizer,
)
