"""The VAE's walks, `decode` and (when the model has its encoder) `encode`, and the run-time
inputs of its front."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from walkforge.graphs.walk import GraphNode, Sequential, TensorSpec
from walkforge.recipes.blocks.autoencoder import AutoencoderKL, AutoencoderKLDecoder
from walkforge.recipes.vae.config import VaeConfig


def walks(model: nn.Module, cfg: VaeConfig) -> Sequential:
    """`decode`: latents [B, C, h, w] → sample [B, out, h·f, w·f]; with the encoder also `encode`:
    images [B, out, H, W] → latent_mean, latent_std [B, C, H/f, W/f]. The plan runs decode."""
    example = torch.randn(2, cfg.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    node = GraphNode(
        name="decode",
        module=model if model.encoder is None else DecodeWalk(model),
        inputs=(TensorSpec("latents", "float32", ("batch", cfg.latent_channels, "height", "width")),),
        outputs=(TensorSpec("sample", "float32",
                            ("batch", cfg.out_channels, "sample_height", "sample_width")),),
        example_inputs={"latents": example},
    )
    nodes = (node,) if model.encoder is None else (node, encode_node(model, cfg))
    return Sequential(nodes=nodes, steps=("decode",))


class DecodeWalk(nn.Module):
    """The decode half of a model that also holds the encoder, under the model's own names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv, self.decoder = model.post_quant_conv, model.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return AutoencoderKLDecoder.forward(self, latents)  # the model's maths, these parameters only


class EncodeWalk(nn.Module):
    """The encode half: encoder (+ quant_conv) → (latent_mean, latent_std)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder, self.quant_conv = model.encoder, model.quant_conv

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return AutoencoderKL.encode(self, images)


def encode_node(model: nn.Module, cfg: VaeConfig) -> GraphNode:
    side = 8 * cfg.upscale
    example = torch.rand(2, cfg.out_channels, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent = ("batch", cfg.latent_channels, "height", "width")
    pixels = ("batch", cfg.out_channels, "sample_height", "sample_width")
    return GraphNode(
        name="encode",
        module=EncodeWalk(model),
        inputs=(TensorSpec("images", "float32", pixels),),
        outputs=(TensorSpec("latent_mean", "float32", latent), TensorSpec("latent_std", "float32", latent)),
        example_inputs={"images": example},
    )


def fake_inputs(cfg: VaeConfig, batch: int = 1, seed: int = 0, height: int = 8,
                width: int = 8) -> dict[str, np.ndarray]:
    """Standard-normal latents of shape [batch, latent_channels, height, width]."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, cfg.latent_channels, height, width), dtype=np.float32)
    return {"latents": latents}


def trt_dims(cfg: VaeConfig) -> dict[str, tuple[int, int, int]]:
    """TensorRT (min, opt, max) of the latent sides (pixels ÷ upscale): 64 px to 1024 px at 8×."""
    return {"height": (8, 64, 128), "width": (8, 64, 128)}
