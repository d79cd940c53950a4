"""The VAE's one walk, `decode`, and the run-time inputs of its front."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from walkforge.graphs.walk import GraphNode, Sequential, TensorSpec
from walkforge.recipes.vae.config import VaeConfig


def walks(model: nn.Module, cfg: VaeConfig) -> Sequential:
    """One walk, `decode`: latents [B, C, h, w] → sample [B, out, h·f, w·f]."""
    example = torch.randn(2, cfg.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    node = GraphNode(
        name="decode",
        module=model,
        inputs=(TensorSpec("latents", "float32", ("batch", cfg.latent_channels, "height", "width")),),
        outputs=(TensorSpec("sample", "float32",
                            ("batch", cfg.out_channels, "sample_height", "sample_width")),),
        example_inputs={"latents": example},
    )
    return Sequential(nodes=(node,), steps=("decode",))


def fake_inputs(cfg: VaeConfig, batch: int = 1, seed: int = 0, height: int = 8,
                width: int = 8) -> dict[str, np.ndarray]:
    """Standard-normal latents of shape [batch, latent_channels, height, width]."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, cfg.latent_channels, height, width), dtype=np.float32)
    return {"latents": latents}
