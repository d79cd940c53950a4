"""VAE decoder sizes: `VaeConfig` and its named variants (SD, FLUX, tiny)."""

from __future__ import annotations

from dataclasses import dataclass

from walkforge.errors import WalkforgeError


@dataclass(frozen=True)
class VaeConfig:
    """Decoder shape. The activation is always SiLU and every block is UpDecoderBlock2D."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    out_channels: int = 3
    norm_num_groups: int = 32
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        sizes = (self.layers_per_block, self.latent_channels, self.out_channels, self.norm_num_groups,
                 *self.block_out_channels)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            raise WalkforgeError(f"VaeConfig: sizes must be positive integers, got {self}")
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise WalkforgeError(
                f"VaeConfig: block_out_channels {list(self.block_out_channels)} must be non-empty "
                f"and divisible by norm_num_groups={self.norm_num_groups}"
            )

    @property
    def upscale(self) -> int:
        """Pixels per latent along each spatial axis."""
        return 2 ** (len(self.block_out_channels) - 1)


VARIANTS: dict[str, VaeConfig] = {
    "sd": VaeConfig(),
    "flux": VaeConfig(latent_channels=16, use_post_quant_conv=False),
    "tiny": VaeConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
}
