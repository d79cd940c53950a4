"""The VAE module: the shared AutoencoderKL block, shaped by a VaeConfig."""

from __future__ import annotations

from torch import nn

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.autoencoder import AutoencoderKL
from walkforge.recipes.vae.config import VaeConfig

WALKS = ("decode", "encode")


def build(cfg: VaeConfig, walks: tuple[str, ...] = ("decode",)) -> nn.Module:
    """The decoder (with post_quant_conv when configured), forward(latents) -> sample; with
    "encode" in `walks` also the encoder (and quant_conv), `encode(images) -> (mean, std)`."""
    unknown = sorted(set(walks) - set(WALKS))
    if unknown or "decode" not in walks:
        raise WalkforgeError(f"--walks: the vae recipe compiles decode and optionally encode, got "
                             f"{','.join(walks)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return AutoencoderKL(
        latent_channels=cfg.latent_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        mid_attention=cfg.mid_block_add_attention,
        post_quant_conv=cfg.use_post_quant_conv,
        encoder="encode" in walks,
    )
