"""The VAE decoder module: the shared AutoencoderKL decoder block, shaped by a VaeConfig."""

from __future__ import annotations

from torch import nn

from walkforge.recipes.blocks.autoencoder import AutoencoderKLDecoder
from walkforge.recipes.vae.config import VaeConfig


def build(cfg: VaeConfig) -> nn.Module:
    """The decoder (with post_quant_conv when configured); forward(latents) -> sample."""
    return AutoencoderKLDecoder(
        latent_channels=cfg.latent_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        mid_attention=cfg.mid_block_add_attention,
        post_quant_conv=cfg.use_post_quant_conv,
    )
