"""pi0.5 (LeRobot's pi05): pi0's PaliGemma VLM and prefix, a Gemma action expert with adaRMS
norms conditioned on the flow time, no state input (the state is prompt text); three walks.

config.py      Pi05Config and its variants
model.py       the modules (the prefix methods are pi0's), the suffix and the eager `sample_actions`
walks.py       vision → prefill → Loop(denoise), fake inputs, kernel shapes
checkpoint.py  LeRobot's pi05 key map and folder reader
"""

from __future__ import annotations

from walkforge.recipes import lerobot
from walkforge.recipes.blocks import flow
from walkforge.recipes.pi05 import checkpoint, config, model, walks
from walkforge.recipes.recipe import Recipe

RECIPE = Recipe(
    name="pi05",
    config=config.Pi05Config,
    variants=config.VARIANTS,
    build=model.build,
    walks=walks.walks,
    key_map=checkpoint.KEY_MAP,
    read_checkpoint=checkpoint.read_checkpoint,
    fake_inputs=walks.fake_inputs,
    front="pi05",
    precisions=("fp32", "fp8"),
    # the compacted prefix's dims, as pi0's
    trt_dims=flow.prefix_trt_dims,
    kernel_shapes=flow.expert_kernel_shapes,
    variant_manifest=checkpoint.POLICY.variant_manifest,
    tokenizer=lerobot.bundle_tokenizer,
)
